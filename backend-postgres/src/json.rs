//! JSON text bound as PostgreSQL `json`, the type of `payload` and `result`.
//!
//! The store keeps JSON as the text it was given (schema version 4), as
//! the SQLite and memory stores do: a payload reads back with its numbers
//! as written (`1e17` stays a float, `-0.0` keeps its sign; `jsonb` turned
//! them into the integer `100000000000000000` and `0.0`), and the server
//! only validates the text instead of building a `jsonb` tree from it
//! (measured with pgbench, 1,000-row inserts: about a tenth more rows per
//! second). sqlx binds JSON as `jsonb`, hence this type.

use serde_json::Value;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo};
use sqlx::{Encode, Postgres, Type};

/// `json`'s type OID, fixed in PostgreSQL's catalog.
const JSON_OID: Oid = Oid(114);

/// `json[]`'s type OID, fixed in PostgreSQL's catalog.
const JSON_ARRAY_OID: Oid = Oid(199);

/// Checked JSON text, sent as a `json` parameter in binary format, which
/// for `json` is the text itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JsonText<'a>(pub(crate) &'a str);

impl Type<Postgres> for JsonText<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_OID)
    }
}

impl PgHasArrayType for JsonText<'_> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_ARRAY_OID)
    }
}

impl Encode<'_, Postgres> for JsonText<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        buf.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}

/// A handler's result as the text to bind (a tree always serializes).
pub(crate) fn result_text(result: Option<&Value>) -> Option<String> {
    result.map(Value::to_string)
}
