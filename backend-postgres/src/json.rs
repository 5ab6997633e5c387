//! JSON bound as PostgreSQL `json`, the type of `payload` and `result`.
//!
//! The store keeps JSON as the text it was given (schema version 4), as
//! the SQLite and memory stores do: a payload reads back with its numbers
//! as written (`1e17` stays a float, `-0.0` keeps its sign; `jsonb` turned
//! them into the integer `100000000000000000` and `0.0`), and the server
//! only validates the text instead of building a `jsonb` tree from it.
//! sqlx binds JSON as `jsonb`, hence this type.

use serde::Serialize;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgHasArrayType, PgTypeInfo};
use sqlx::{Encode, Postgres, Type};

/// `json`'s type OID, fixed in PostgreSQL's catalog.
const JSON_OID: Oid = Oid(114);

/// `json[]`'s type OID, fixed in PostgreSQL's catalog.
const JSON_ARRAY_OID: Oid = Oid(199);

/// A value serialized as a `json` parameter, in binary format, which for
/// `json` is the text itself: a checked payload's
/// [`RawValue`](serde_json::value::RawValue) is copied as is, a result's
/// tree written straight into the parameter buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AsJson<T>(pub(crate) T);

impl<T> Type<Postgres> for AsJson<T> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_OID)
    }
}

impl<T> PgHasArrayType for AsJson<T> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_ARRAY_OID)
    }
}

impl<T: Serialize> Encode<'_, Postgres> for AsJson<T> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        serde_json::to_writer(&mut **buf, &self.0)?;
        Ok(IsNull::No)
    }
}
