//! Sans-IO sync engine (placeholder).
