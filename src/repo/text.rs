//! Rich text helpers for editors: splices and marks at offsets in the unit the editor uses
//! ([`TextIndex`]: Unicode code points or UTF-16 code units, as in JavaScript), diffing a new
//! string in with `update_text`, and stable cursors that survive concurrent edits.
//!
//! Automerge indexes text in the document's own [`TextEncoding`] (code points in this build).
//! Every offset here is converted from the caller's unit to the document's and back, against
//! the text as it is inside the same transaction, so a splice never lands in the middle of a
//! character. An UTF-16 offset that falls between the two halves of a surrogate pair (an emoji,
//! say) is rejected with [`TextError::SplitsSurrogatePair`] rather than rounded.
//!
//! The free functions ([`splice`], [`mark`], [`marks`], [`cursor`]...) work on any Automerge
//! document or transaction; the [`DocHandle`] methods wrap them in one change each.
//!
//! Patches (from [`DocHandle::changes`] or [`DocHandle::diff`]) count text in the document's
//! unit too. [`text_patches`] (and [`crate::repo::ChangeEvent::text_patches`]) turn those of
//! one text object into [`TextPatch`]es in the editor's unit, ready to apply to its buffer.

use std::ops::Range;

use automerge::marks::{ExpandMark, Mark, MarkSet};
use automerge::transaction::{Transactable, Transaction};
use automerge::{
    AutomergeError, Cursor, CursorPosition, ObjId, Patch, PatchAction, ReadDoc, ScalarValue,
    TextEncoding,
};

use super::{DocHandle, RepoError};

/// The unit an editor counts text offsets in. Chosen explicitly on every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextIndex {
    /// Unicode scalar values (Rust `char`s; Python, Swift `unicodeScalars`).
    CodePoints,
    /// UTF-16 code units (JavaScript strings, DOM selections, CodeMirror, ProseMirror).
    Utf16,
}

/// What can go wrong editing text.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("UTF-16 offset {offset} falls inside a surrogate pair")]
    SplitsSurrogatePair { offset: usize },
    #[error("offset {offset} is past the end of the text ({len} {unit:?} long)")]
    OutOfRange {
        offset: usize,
        len: usize,
        unit: TextIndex,
    },
    #[error("range {start}..{end} ends before it starts")]
    BadRange { start: usize, end: usize },
    #[error("the object is not text")]
    NotText,
    #[error("the document counts text in {0:?}, which sheaf does not convert")]
    UnsupportedEncoding(TextEncoding),
    /// Patch number `patch` (from 0) of those given does not fit the text as the patches
    /// before it left it (they were not made from that text), or overwrites an element in
    /// place, which text edits never do.
    #[error("patch {patch} does not fit the text it applies to")]
    PatchMismatch { patch: usize },
    #[error(transparent)]
    Automerge(#[from] AutomergeError),
    #[error(transparent)]
    Repo(Box<RepoError>),
}

impl From<RepoError> for TextError {
    fn from(e: RepoError) -> Self {
        Self::Repo(Box::new(e))
    }
}

/// A mark (bold, link, comment...) over a range in the caller's unit.
#[derive(Debug, Clone, PartialEq)]
pub struct TextMark {
    pub name: String,
    pub value: ScalarValue,
    pub range: Range<usize>,
}

/// One change to a text object, with offsets in the caller's unit. Apply a list of them in
/// order: each offset counts in the text as the patches before it left it.
#[derive(Debug, Clone, PartialEq)]
pub enum TextPatch {
    /// `value` was inserted at `index`; `marks` are the marks over the inserted text.
    SpliceText {
        index: usize,
        value: String,
        marks: Option<MarkSet>,
    },
    /// `length` units were deleted at `index`.
    DeleteSeq { index: usize, length: usize },
    /// Marks were set over these ranges (a null value removes the mark there). The text
    /// does not change.
    Mark { marks: Vec<TextMark> },
}

/// The document's native unit, as far as sheaf converts.
#[derive(Clone, Copy)]
enum Native {
    CodePoints,
    Utf16,
    Utf8,
}

fn native(enc: TextEncoding) -> Result<Native, TextError> {
    match enc {
        TextEncoding::UnicodeCodePoint => Ok(Native::CodePoints),
        TextEncoding::Utf16CodeUnit => Ok(Native::Utf16),
        TextEncoding::Utf8CodeUnit => Ok(Native::Utf8),
        other => Err(TextError::UnsupportedEncoding(other)),
    }
}

fn char_width(c: char, n: Native) -> usize {
    match n {
        Native::CodePoints => 1,
        Native::Utf16 => c.len_utf16(),
        Native::Utf8 => c.len_utf8(),
    }
}

impl From<TextIndex> for Native {
    fn from(u: TextIndex) -> Self {
        match u {
            TextIndex::CodePoints => Native::CodePoints,
            TextIndex::Utf16 => Native::Utf16,
        }
    }
}

/// The length of `s` in `unit`.
pub fn text_len(s: &str, unit: TextIndex) -> usize {
    match unit {
        TextIndex::CodePoints => s.chars().count(),
        TextIndex::Utf16 => s.encode_utf16().count(),
    }
}

/// The code-point index of `offset` (counted in `n`); errors if it splits a character.
fn to_chars(s: &str, offset: usize, n: Native, unit: TextIndex) -> Result<usize, TextError> {
    let mut at = 0;
    for (i, c) in s.chars().enumerate() {
        if at == offset {
            return Ok(i);
        }
        at += char_width(c, n);
        if at > offset {
            return Err(TextError::SplitsSurrogatePair { offset });
        }
    }
    if at == offset {
        Ok(s.chars().count())
    } else {
        Err(TextError::OutOfRange {
            offset,
            len: at,
            unit,
        })
    }
}

/// The offset, counted in `n`, of code point `chars`.
fn from_chars(s: &str, chars: usize, n: Native) -> usize {
    s.chars().take(chars).map(|c| char_width(c, n)).sum()
}

/// Convert an offset in `unit` into the same position in `to`. Fails on an offset that splits a
/// surrogate pair or lies past the end.
pub fn convert_offset(
    s: &str,
    offset: usize,
    unit: TextIndex,
    to: TextIndex,
) -> Result<usize, TextError> {
    let c = to_chars(s, offset, unit.into(), unit)?;
    Ok(from_chars(s, c, to.into()))
}

fn to_native(
    s: &str,
    offset: usize,
    unit: TextIndex,
    enc: TextEncoding,
) -> Result<usize, TextError> {
    let c = to_chars(s, offset, unit.into(), unit)?;
    Ok(from_chars(s, c, native(enc)?))
}

fn from_native(
    s: &str,
    offset: usize,
    enc: TextEncoding,
    unit: TextIndex,
) -> Result<usize, TextError> {
    let c = to_chars(s, offset, native(enc)?, unit)?;
    Ok(from_chars(s, c, unit.into()))
}

/// Where native offset `at` is in `s`: its byte offset and its offset in `unit`; `None` if it
/// is past the end or inside a character.
fn locate(s: &str, at: usize, n: Native, unit: TextIndex) -> Option<(usize, usize)> {
    let (mut native, mut out) = (0, 0);
    for (b, c) in s.char_indices() {
        if native == at {
            return Some((b, out));
        }
        if native > at {
            return None;
        }
        native += char_width(c, n);
        out += char_width(c, unit.into());
    }
    (native == at).then_some((s.len(), out))
}

/// The patches of `patches` that change text object `obj`, with offsets in `unit`.
///
/// `before` is the text as it was before the first patch, and `encoding` the document's
/// ([`ReadDoc::text_encoding`]); patches on other objects are skipped. Patches of one change
/// set follow each other: each index counts in the text as the patches before it left it,
/// so they are applied to a copy of `before` one by one and converted against it (a walk of
/// the text per patch). Elements that are not characters (JS rich-text blocks) count as
/// U+FFFC, as in [`ReadDoc::text`]. Fails with [`TextError::PatchMismatch`] if a patch does
/// not fit.
pub fn text_patches(
    before: &str,
    patches: &[Patch],
    obj: &ObjId,
    encoding: TextEncoding,
    unit: TextIndex,
) -> Result<Vec<TextPatch>, TextError> {
    text_patches_and_after(before, patches, obj, encoding, unit).map(|(p, _)| p)
}

/// [`text_patches`], plus the text as the patches leave it.
pub(crate) fn text_patches_and_after(
    before: &str,
    patches: &[Patch],
    obj: &ObjId,
    encoding: TextEncoding,
    unit: TextIndex,
) -> Result<(Vec<TextPatch>, String), TextError> {
    let n = native(encoding)?;
    let mut s = before.to_string();
    let mut out = Vec::new();
    for (i, p) in patches.iter().enumerate().filter(|(_, p)| &p.obj == obj) {
        let mismatch = TextError::PatchMismatch { patch: i };
        match &p.action {
            PatchAction::SpliceText {
                index,
                value,
                marks,
            } => {
                let (b, at) = locate(&s, *index, n, unit).ok_or(mismatch)?;
                let value = value.make_string();
                s.insert_str(b, &value);
                out.push(TextPatch::SpliceText {
                    index: at,
                    value,
                    marks: marks.clone(),
                });
            }
            PatchAction::DeleteSeq { index, length } => {
                let (b, at) = locate(&s, *index, n, unit).ok_or(mismatch)?;
                let (len_b, len) = locate(&s[b..], *length, n, unit)
                    .ok_or(TextError::PatchMismatch { patch: i })?;
                s.replace_range(b..b + len_b, "");
                out.push(TextPatch::DeleteSeq {
                    index: at,
                    length: len,
                });
            }
            PatchAction::Mark { marks } => {
                let marks = marks
                    .iter()
                    .map(|m| {
                        let (_, start) = locate(&s, m.start, n, unit)?;
                        let (_, end) = locate(&s, m.end, n, unit)?;
                        Some(TextMark {
                            name: m.name().to_string(),
                            value: m.value().clone(),
                            range: start..end,
                        })
                    })
                    .collect::<Option<Vec<_>>>()
                    .ok_or(mismatch)?;
                out.push(TextPatch::Mark { marks });
            }
            // Elements that are not characters (JS rich-text blocks, say) read as U+FFFC in
            // `ReadDoc::text`: inserting them inserts that.
            PatchAction::Insert { index, values } => {
                let (b, at) = locate(&s, *index, n, unit).ok_or(mismatch)?;
                let value: String = values
                    .iter()
                    .map(|(v, _, _)| match v {
                        automerge::Value::Scalar(sv) => match sv.as_ref() {
                            ScalarValue::Str(t) => t.to_string(),
                            _ => "\u{fffc}".to_string(),
                        },
                        automerge::Value::Object(_) => "\u{fffc}".to_string(),
                    })
                    .collect();
                s.insert_str(b, &value);
                out.push(TextPatch::SpliceText {
                    index: at,
                    value,
                    marks: None,
                });
            }
            // The text reads the same.
            PatchAction::Increment { .. } | PatchAction::Conflict { .. } => {}
            // Overwriting an element in place: not something text editing does.
            PatchAction::PutSeq { .. }
            | PatchAction::PutMap { .. }
            | PatchAction::DeleteMap { .. } => return Err(mismatch),
        }
    }
    Ok((out, s))
}

fn text_of<D: ReadDoc>(doc: &D, obj: &ObjId) -> Result<String, TextError> {
    match doc.object_type(obj) {
        Ok(automerge::ObjType::Text) => Ok(doc.text(obj)?),
        Ok(_) => Err(TextError::NotText),
        Err(e) => Err(e.into()),
    }
}

fn native_range<D: ReadDoc>(
    doc: &D,
    s: &str,
    range: &Range<usize>,
    unit: TextIndex,
) -> Result<Range<usize>, TextError> {
    if range.end < range.start {
        return Err(TextError::BadRange {
            start: range.start,
            end: range.end,
        });
    }
    let enc = doc.text_encoding();
    Ok(to_native(s, range.start, unit, enc)?..to_native(s, range.end, unit, enc)?)
}

/// Replace `delete` units at `index` with `insert`.
pub fn splice<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    index: usize,
    delete: usize,
    insert: &str,
    unit: TextIndex,
) -> Result<(), TextError> {
    let s = text_of(tx, obj)?;
    let r = native_range(tx, &s, &(index..index.saturating_add(delete)), unit)?;
    tx.splice_text(obj, r.start, (r.end - r.start) as isize, insert)?;
    Ok(())
}

/// Mark `range` with `name` = `value`. `expand` says whether text typed at the edges joins it.
pub fn mark<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    range: Range<usize>,
    name: &str,
    value: impl Into<ScalarValue>,
    expand: ExpandMark,
    unit: TextIndex,
) -> Result<(), TextError> {
    let s = text_of(tx, obj)?;
    let r = native_range(tx, &s, &range, unit)?;
    tx.mark(obj, Mark::new(name.into(), value, r.start, r.end), expand)?;
    Ok(())
}

/// Remove mark `name` from `range`.
pub fn unmark<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    range: Range<usize>,
    name: &str,
    expand: ExpandMark,
    unit: TextIndex,
) -> Result<(), TextError> {
    let s = text_of(tx, obj)?;
    let r = native_range(tx, &s, &range, unit)?;
    tx.unmark(obj, name, r.start, r.end, expand)?;
    Ok(())
}

/// Every mark on the text, with ranges in `unit`.
pub fn marks<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    unit: TextIndex,
) -> Result<Vec<TextMark>, TextError> {
    let s = text_of(doc, obj)?;
    let enc = doc.text_encoding();
    doc.marks(obj)?
        .into_iter()
        .map(|m| {
            Ok(TextMark {
                name: m.name().to_string(),
                value: m.value().clone(),
                range: from_native(&s, m.start, enc, unit)?..from_native(&s, m.end, enc, unit)?,
            })
        })
        .collect()
}

/// A stable cursor before the character at `index` (or at the end when `index` is the
/// length). It follows that character through concurrent edits; if the character is deleted
/// it moves to the next surviving one.
pub fn cursor<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    index: usize,
    unit: TextIndex,
) -> Result<Cursor, TextError> {
    let s = text_of(doc, obj)?;
    let i = to_native(&s, index, unit, doc.text_encoding())?;
    let pos = if i == doc.length(obj) {
        CursorPosition::End
    } else {
        CursorPosition::Index(i)
    };
    Ok(doc.get_cursor(obj, pos, None)?)
}

/// Where `cursor` is now, in `unit`.
pub fn cursor_position<D: ReadDoc>(
    doc: &D,
    obj: &ObjId,
    cursor: &Cursor,
    unit: TextIndex,
) -> Result<usize, TextError> {
    let s = text_of(doc, obj)?;
    let i = doc.get_cursor_position(obj, cursor, None)?;
    from_native(&s, i, doc.text_encoding(), unit)
}

impl DocHandle {
    /// One change in which text helpers can fail with a [`TextError`] (rolled back then).
    fn change_text<R>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<R, TextError>,
    ) -> Result<R, TextError> {
        let mut err = None;
        let r = self.change(|tx| {
            f(tx).map_err(|e| {
                err = Some(e);
                AutomergeError::Fail
            })
        });
        match (r, err) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
    }

    /// The current text of `obj`.
    pub fn text(&self, obj: &ObjId) -> Result<String, TextError> {
        self.with_doc(|d| text_of(d, obj))
    }

    /// Replace `delete` units at `index` with `insert` (offsets in `unit`).
    pub fn splice_text(
        &self,
        obj: &ObjId,
        index: usize,
        delete: usize,
        insert: &str,
        unit: TextIndex,
    ) -> Result<(), TextError> {
        self.change_text(|tx| splice(tx, obj, index, delete, insert, unit))
    }

    /// Make the text equal to `new_text` with a minimal set of splices (a diff against the
    /// current text), so concurrent edits elsewhere in the text survive.
    pub fn update_text(&self, obj: &ObjId, new_text: &str) -> Result<(), TextError> {
        self.change_text(|tx| {
            text_of(tx, obj)?;
            tx.update_text(obj, new_text)?;
            Ok(())
        })
    }

    /// Mark `range` (in `unit`) with `name` = `value`: `("bold", true)`,
    /// `("link", "https://…")`, `("comment", "<comment id>")`.
    pub fn mark(
        &self,
        obj: &ObjId,
        range: Range<usize>,
        name: &str,
        value: impl Into<ScalarValue>,
        expand: ExpandMark,
        unit: TextIndex,
    ) -> Result<(), TextError> {
        self.change_text(|tx| mark(tx, obj, range, name, value, expand, unit))
    }

    /// Remove mark `name` from `range` (in `unit`).
    pub fn unmark(
        &self,
        obj: &ObjId,
        range: Range<usize>,
        name: &str,
        expand: ExpandMark,
        unit: TextIndex,
    ) -> Result<(), TextError> {
        self.change_text(|tx| unmark(tx, obj, range, name, expand, unit))
    }

    /// Every mark on the text, ranges in `unit`.
    pub fn marks(&self, obj: &ObjId, unit: TextIndex) -> Result<Vec<TextMark>, TextError> {
        self.with_doc(|d| marks(d, obj, unit))
    }

    /// A stable cursor at `index` (in `unit`); see [`cursor`].
    pub fn cursor(&self, obj: &ObjId, index: usize, unit: TextIndex) -> Result<Cursor, TextError> {
        self.with_doc(|d| cursor(d, obj, index, unit))
    }

    /// Where `cursor` points now, in `unit`.
    pub fn cursor_position(
        &self,
        obj: &ObjId,
        cursor: &Cursor,
        unit: TextIndex,
    ) -> Result<usize, TextError> {
        self.with_doc(|d| cursor_position(d, obj, cursor, unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{Automerge, ObjType, ROOT};

    /// A note whose "text" is `s`, and that text's id.
    fn doc_with(s: &str) -> (Automerge, ObjId) {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        let t = tx.put_object(ROOT, "text", ObjType::Text).unwrap();
        tx.splice_text(&t, 0, 0, s).unwrap();
        tx.commit();
        (doc, t)
    }

    fn change(doc: &mut Automerge, f: impl FnOnce(&mut Transaction<'_>)) -> Vec<Patch> {
        let before = doc.get_heads();
        let mut tx = doc.transaction();
        f(&mut tx);
        tx.commit();
        doc.diff(&before, &doc.get_heads())
    }

    /// Apply text patches in UTF-16 units to a UTF-16 buffer, as a JS editor would.
    fn apply_utf16(view: &mut Vec<u16>, patches: &[TextPatch]) {
        for p in patches {
            match p {
                TextPatch::SpliceText { index, value, .. } => {
                    let at = *index;
                    view.splice(at..at, value.encode_utf16());
                }
                TextPatch::DeleteSeq { index, length } => {
                    view.drain(*index..*index + *length);
                }
                TextPatch::Mark { marks } => {
                    for m in marks {
                        assert!(m.range.start <= m.range.end && m.range.end <= view.len());
                    }
                }
            }
        }
    }

    #[test]
    fn patches_after_an_emoji_convert_to_utf16() {
        let (mut doc, t) = doc_with("a😀b");
        let enc = doc.text_encoding();
        // insert after the emoji: code point 2, UTF-16 unit 3
        let p = change(&mut doc, |tx| tx.splice_text(&t, 2, 0, "xy").unwrap());
        let cp = text_patches("a😀b", &p, &t, enc, TextIndex::CodePoints).unwrap();
        let u16 = text_patches("a😀b", &p, &t, enc, TextIndex::Utf16).unwrap();
        let splice = |index: usize| TextPatch::SpliceText {
            index,
            value: "xy".into(),
            marks: None,
        };
        assert_eq!((cp, u16), (vec![splice(2)], vec![splice(3)]));
        // delete the emoji: one code point, two UTF-16 units
        let p = change(&mut doc, |tx| tx.splice_text(&t, 1, 1, "").unwrap());
        assert_eq!(
            text_patches("a😀xyb", &p, &t, enc, TextIndex::Utf16).unwrap(),
            vec![TextPatch::DeleteSeq {
                index: 1,
                length: 2
            }]
        );
        // a mark over an emoji
        let (mut doc, t) = doc_with("a😀b");
        let p = change(&mut doc, |tx| {
            tx.mark(&t, Mark::new("bold".into(), true, 1, 3), ExpandMark::None)
                .unwrap()
        });
        let got = text_patches("a😀b", &p, &t, enc, TextIndex::Utf16).unwrap();
        assert_eq!(
            got,
            vec![TextPatch::Mark {
                marks: vec![TextMark {
                    name: "bold".into(),
                    value: ScalarValue::Boolean(true),
                    range: 1..4,
                }]
            }]
        );
        // patches that were not made from this text
        assert!(matches!(
            text_patches("", &p, &t, enc, TextIndex::Utf16),
            Err(TextError::PatchMismatch { patch: 0 })
        ));
    }

    #[test]
    fn each_patch_counts_in_the_text_the_previous_ones_left() {
        let (mut doc, t) = doc_with("a😀b");
        let enc = doc.text_encoding();
        // Three splices in one change: insert after the emoji, delete the leading "a" (which
        // shifts everything after it), insert at the end.
        let p = change(&mut doc, |tx| {
            tx.splice_text(&t, 2, 0, "🎉").unwrap(); // a😀🎉b
            tx.splice_text(&t, 0, 1, "").unwrap(); // 😀🎉b
            tx.splice_text(&t, 3, 0, "!").unwrap(); // 😀🎉b!
        });
        assert_eq!(doc.text(&t).unwrap(), "😀🎉b!");
        assert!(p.len() >= 3, "{p:?}");
        let got = text_patches("a😀b", &p, &t, enc, TextIndex::Utf16).unwrap();
        assert_eq!(
            got,
            vec![
                TextPatch::DeleteSeq {
                    index: 0,
                    length: 1
                },
                TextPatch::SpliceText {
                    index: 2,
                    value: "🎉".into(),
                    marks: None
                },
                TextPatch::SpliceText {
                    index: 5,
                    value: "!".into(),
                    marks: None
                },
            ]
        );

        // Many random edits (emoji and marks included) between random versions: the UTF-16
        // patches always take the UTF-16 text from one version to the other.
        let (mut doc, t) = doc_with("héllo 😀 wörld");
        let mut versions = vec![doc.get_heads()];
        let mut seed = 7u64;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n.max(1)
        };
        let pieces = ["x", "😀", "é", "👋🏽", "ab", "\n"];
        for _ in 0..60 {
            let mut tx = doc.transaction();
            for _ in 0..1 + next(3) {
                let len = tx.length(&t);
                let at = next(len + 1);
                match next(3) {
                    0 if len > at => {
                        let del = 1 + next((len - at).min(3));
                        tx.splice_text(&t, at, del as isize, "").unwrap();
                    }
                    1 if len > at + 1 => {
                        let m = Mark::new("em".into(), true, at, at + 2);
                        tx.mark(&t, m, ExpandMark::After).unwrap();
                    }
                    _ => {
                        let piece = pieces[next(pieces.len())];
                        tx.splice_text(&t, at, 0, piece).unwrap();
                    }
                }
            }
            tx.commit();
            versions.push(doc.get_heads());
        }
        for _ in 0..100 {
            let (a, b) = (
                &versions[next(versions.len())],
                &versions[next(versions.len())],
            );
            let before = doc.text_at(&t, a).unwrap();
            let patches = doc.diff(a, b);
            let tp = text_patches(&before, &patches, &t, enc, TextIndex::Utf16).unwrap();
            let mut view: Vec<u16> = before.encode_utf16().collect();
            apply_utf16(&mut view, &tp);
            assert_eq!(
                String::from_utf16(&view).unwrap(),
                doc.text_at(&t, b).unwrap()
            );
        }
    }

    #[test]
    fn utf16_offsets_around_emoji() {
        let s = "a😀b"; // a=1, 😀=2 UTF-16 units, b=1
        assert_eq!(text_len(s, TextIndex::Utf16), 4);
        assert_eq!(text_len(s, TextIndex::CodePoints), 3);
        let c = |o| convert_offset(s, o, TextIndex::Utf16, TextIndex::CodePoints);
        assert_eq!(c(0).unwrap(), 0);
        assert_eq!(c(1).unwrap(), 1);
        assert!(matches!(
            c(2),
            Err(TextError::SplitsSurrogatePair { offset: 2 })
        ));
        assert_eq!(c(3).unwrap(), 2);
        assert_eq!(c(4).unwrap(), 3);
        assert!(matches!(c(5), Err(TextError::OutOfRange { .. })));
        let back = |o| convert_offset(s, o, TextIndex::CodePoints, TextIndex::Utf16).unwrap();
        assert_eq!((back(0), back(1), back(2), back(3)), (0, 1, 3, 4));
    }
}
