//! History of a note.
