//! The two built-in invariants: [`UniqueList`] (no value twice in a list) and
//! [`RequiredField`] (a field that must exist, recreated with a default).

use std::collections::BTreeMap;

use automerge::transaction::{Transactable, Transaction};
use automerge::{AutomergeError, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::{Invariant, Violation};

/// Where a field is: map keys from the root (`"tags"`, or `["meta", "tags"]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    pub fn keys(&self) -> &[String] {
        &self.0
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

impl From<&str> for FieldPath {
    fn from(key: &str) -> Self {
        Self(vec![key.to_string()])
    }
}

impl From<String> for FieldPath {
    fn from(key: String) -> Self {
        Self(vec![key])
    }
}

impl From<&[&str]> for FieldPath {
    fn from(keys: &[&str]) -> Self {
        Self(keys.iter().map(|k| k.to_string()).collect())
    }
}

impl<const N: usize> From<[&str; N]> for FieldPath {
    fn from(keys: [&str; N]) -> Self {
        Self(keys.iter().map(|k| k.to_string()).collect())
    }
}

impl From<Vec<String>> for FieldPath {
    fn from(keys: Vec<String>) -> Self {
        Self(keys)
    }
}

/// The map object at `keys` (from the root), if every step is a map.
fn map_at(doc: &Transaction<'_>, keys: &[String]) -> Option<ObjId> {
    let mut obj = ROOT;
    for k in keys {
        match doc.get(&obj, k.as_str()).ok()?? {
            (Value::Object(ObjType::Map), id) => obj = id,
            _ => return None,
        }
    }
    Some(obj)
}

/// The list object at `path`, if there is one.
fn list_at(doc: &Transaction<'_>, path: &FieldPath) -> Option<ObjId> {
    let (last, parents) = path.0.split_last()?;
    let parent = map_at(doc, parents)?;
    match doc.get(&parent, last.as_str()).ok()?? {
        (Value::Object(ObjType::List), id) => Some(id),
        _ => None,
    }
}

/// A list entry's identity for uniqueness. Strings and text objects with the same content
/// are the same value, as are signed and unsigned integers with the same value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ValueKey {
    Null,
    Bool(bool),
    Int(i128),
    /// By bit pattern (so `NaN == NaN`, and `0.0 != -0.0`): a total, deterministic order.
    F64(u64),
    Timestamp(i64),
    Str(String),
    Bytes(Vec<u8>),
}

impl std::fmt::Display for ValueKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueKey::Null => f.write_str("null"),
            ValueKey::Bool(b) => write!(f, "{b}"),
            ValueKey::Int(i) => write!(f, "{i}"),
            ValueKey::F64(bits) => write!(f, "{}", f64::from_bits(*bits)),
            ValueKey::Timestamp(t) => write!(f, "timestamp {t}"),
            ValueKey::Str(s) => write!(f, "{s:?}"),
            ValueKey::Bytes(b) => write!(f, "{} bytes", b.len()),
        }
    }
}

fn scalar_key(s: &ScalarValue) -> Option<ValueKey> {
    Some(match s {
        ScalarValue::Null => ValueKey::Null,
        ScalarValue::Boolean(b) => ValueKey::Bool(*b),
        ScalarValue::Int(i) => ValueKey::Int(i128::from(*i)),
        ScalarValue::Uint(u) => ValueKey::Int(i128::from(*u)),
        ScalarValue::Counter(c) => ValueKey::Int(i128::from(i64::from(c))),
        ScalarValue::F64(f) => ValueKey::F64(f.to_bits()),
        ScalarValue::Timestamp(t) => ValueKey::Timestamp(*t),
        ScalarValue::Str(s) => ValueKey::Str(s.to_string()),
        ScalarValue::Bytes(b) => ValueKey::Bytes(b.clone()),
        // A type from a newer automerge: not comparable, never counted as a duplicate.
        ScalarValue::Unknown { .. } => return None,
    })
}

fn value_key(doc: &Transaction<'_>, value: &Value<'_>, id: &ObjId) -> Option<ValueKey> {
    match value {
        Value::Scalar(s) => scalar_key(s),
        Value::Object(ObjType::Text) => doc.text(id).ok().map(ValueKey::Str),
        Value::Object(_) => None,
    }
}

/// No value appears twice in a list: tags, member ids, record ids (with
/// [`UniqueList::by_field`]).
///
/// **Repair:** keep the first occurrence of each value in list order, delete the later ones.
/// Every replica orders existing elements the same way, so peers repairing the same merged
/// state delete exactly the same elements (see the [module docs](super) for why concurrent
/// repairs converge). Entries that are not comparable (objects other than text, or maps
/// without the field) are left alone. A missing list is not a violation (pair this with a
/// [`RequiredField`] if the list must exist).
#[derive(Debug, Clone)]
pub struct UniqueList {
    name: String,
    path: FieldPath,
    field: Option<String>,
}

impl UniqueList {
    /// The scalar (or text) entries of the list at `path` are unique.
    pub fn new(path: impl Into<FieldPath>) -> Self {
        let path = path.into();
        Self {
            name: format!("unique {path}"),
            path,
            field: None,
        }
    }

    /// The list at `path` holds maps whose `field` is unique (e.g. records with an `id`).
    pub fn by_field(path: impl Into<FieldPath>, field: &str) -> Self {
        let path = path.into();
        Self {
            name: format!("unique {path}[].{field}"),
            path,
            field: Some(field.to_string()),
        }
    }

    /// Name it (default: `unique <path>` or `unique <path>[].<field>`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn entry_key(&self, doc: &Transaction<'_>, list: &ObjId, index: usize) -> Option<ValueKey> {
        let (value, id) = doc.get(list, index).ok()??;
        match &self.field {
            None => value_key(doc, &value, &id),
            Some(field) => {
                if !matches!(value, Value::Object(ObjType::Map)) {
                    return None;
                }
                let (v, vid) = doc.get(&id, field.as_str()).ok()??;
                value_key(doc, &v, &vid)
            }
        }
    }

    /// Indices of the later occurrences (ascending), with the first duplicated value and
    /// how many times it occurs.
    fn duplicates(&self, doc: &Transaction<'_>) -> Option<(ObjId, Vec<usize>, ValueKey, usize)> {
        let list = list_at(doc, &self.path)?;
        let mut seen: BTreeMap<ValueKey, usize> = BTreeMap::new();
        let mut later = Vec::new();
        let mut first_dup: Option<ValueKey> = None;
        for i in 0..doc.length(&list) {
            let Some(key) = self.entry_key(doc, &list, i) else {
                continue;
            };
            let count = seen.entry(key.clone()).or_insert(0);
            *count += 1;
            if *count > 1 {
                later.push(i);
                first_dup.get_or_insert(key);
            }
        }
        let dup = first_dup?;
        let n = seen[&dup];
        Some((list, later, dup, n))
    }
}

impl Invariant for UniqueList {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, doc: &Transaction<'_>) -> Result<(), Violation> {
        match self.duplicates(doc) {
            None => Ok(()),
            Some((_, later, value, n)) => {
                let what = match &self.field {
                    None => format!("{value}"),
                    Some(f) => format!("an entry with {f} = {value}"),
                };
                Err(Violation::new(format!(
                    "{} holds {what} {n} times ({} duplicate entries in all)",
                    self.path,
                    later.len()
                )))
            }
        }
    }

    fn repair(&self, tx: &mut Transaction<'_>, _: &Violation) -> Result<(), AutomergeError> {
        let Some((list, later, _, _)) = self.duplicates(tx) else {
            return Ok(());
        };
        // From the end, so the indices still to delete do not move.
        for i in later.into_iter().rev() {
            tx.delete(&list, i)?;
        }
        Ok(())
    }
}

/// What a [`RequiredField`] is recreated with.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldDefault {
    Scalar(ScalarValue),
    /// A text object with this content.
    Text(String),
    /// An empty map.
    Map,
    /// An empty list.
    List,
}

/// A field that must exist (any value, `null` included).
///
/// **Repair:** recreate the field (and any missing map on its path) with the default. Peers
/// recreating it at once conflict on the key; Automerge picks the same winner on every
/// replica, and either is valid. A field that is deleted on one side while edited on the
/// other (an object field: the edit went into the deleted object) comes back as the
/// default; its old content is still in the note's history.
#[derive(Debug, Clone)]
pub struct RequiredField {
    name: String,
    path: FieldPath,
    default: FieldDefault,
}

impl RequiredField {
    pub fn new(path: impl Into<FieldPath>, default: FieldDefault) -> Self {
        let path = path.into();
        Self {
            name: format!("required {path}"),
            path,
            default,
        }
    }

    /// Name it (default: `required <path>`).
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    fn present(&self, doc: &Transaction<'_>) -> bool {
        let Some((last, parents)) = self.path.0.split_last() else {
            return true;
        };
        map_at(doc, parents).is_some_and(|m| doc.get(&m, last.as_str()).ok().flatten().is_some())
    }
}

impl Invariant for RequiredField {
    fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, doc: &Transaction<'_>) -> Result<(), Violation> {
        if self.present(doc) {
            Ok(())
        } else {
            Err(Violation::new(format!(
                "required field {} is missing",
                self.path
            )))
        }
    }

    fn repair(&self, tx: &mut Transaction<'_>, _: &Violation) -> Result<(), AutomergeError> {
        let Some((last, parents)) = self.path.0.split_last() else {
            return Ok(());
        };
        let mut obj = ROOT;
        for k in parents {
            obj = match tx.get(&obj, k.as_str())? {
                Some((Value::Object(ObjType::Map), id)) => id,
                _ => tx.put_object(&obj, k.as_str(), ObjType::Map)?,
            };
        }
        if tx.get(&obj, last.as_str())?.is_some() {
            return Ok(());
        }
        match &self.default {
            FieldDefault::Scalar(s) => tx.put(&obj, last.as_str(), s.clone())?,
            FieldDefault::Text(t) => {
                let text = tx.put_object(&obj, last.as_str(), ObjType::Text)?;
                if !t.is_empty() {
                    tx.splice_text(&text, 0, 0, t)?;
                }
            }
            FieldDefault::Map => {
                tx.put_object(&obj, last.as_str(), ObjType::Map)?;
            }
            FieldDefault::List => {
                tx.put_object(&obj, last.as_str(), ObjType::List)?;
            }
        }
        Ok(())
    }
}
