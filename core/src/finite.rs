//! Serialization that refuses non-finite floats.
//!
//! JSON has no NaN or infinity, and serde_json writes them as `null`
//! rather than failing: a payload field holding `f64::NAN` would be stored
//! as `null`, and its handler would then fail to decode it or, for an
//! `Option<f64>`, silently read `None`. [`Finite`] serializes a value
//! through any serializer with every float checked on the way, so such a
//! payload is refused when the job is made (an [`Error::InvalidInput`]
//! naming `payload` when pushed) and nothing is written.
//!
//! [`Error::InvalidInput`]: crate::Error::InvalidInput

use serde::ser::{
    Serialize, SerializeMap, SerializeSeq, SerializeStruct, SerializeStructVariant, SerializeTuple,
    SerializeTupleStruct, SerializeTupleVariant, Serializer,
};

/// `T`, serialized with every float checked to be finite.
pub(crate) struct Finite<'a, T: ?Sized>(pub(crate) &'a T);

impl<T: Serialize + ?Sized> Serialize for Finite<'_, T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(Checked(serializer))
    }
}

/// A serializer passing everything to `S` but non-finite floats.
struct Checked<S>(S);

fn refuse<E: serde::ser::Error>(value: f64) -> E {
    E::custom(format!(
        "{value} is not a JSON number (serde_json would store it as null)"
    ))
}

/// Forwards the plain `serialize_*` methods to the inner serializer.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(fn $method(self, $($arg: $ty),*) -> Result<S::Ok, S::Error> {
            self.0.$method($($arg),*)
        })*
    };
}

impl<S: Serializer> Serializer for Checked<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Checked<S::SerializeSeq>;
    type SerializeTuple = Checked<S::SerializeTuple>;
    type SerializeTupleStruct = Checked<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Checked<S::SerializeTupleVariant>;
    type SerializeMap = Checked<S::SerializeMap>;
    type SerializeStruct = Checked<S::SerializeStruct>;
    type SerializeStructVariant = Checked<S::SerializeStructVariant>;

    forward! {
        serialize_bool(v: bool);
        serialize_i8(v: i8);
        serialize_i16(v: i16);
        serialize_i32(v: i32);
        serialize_i64(v: i64);
        serialize_i128(v: i128);
        serialize_u8(v: u8);
        serialize_u16(v: u16);
        serialize_u32(v: u32);
        serialize_u64(v: u64);
        serialize_u128(v: u128);
        serialize_char(v: char);
        serialize_str(v: &str);
        serialize_bytes(v: &[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(name: &'static str);
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str);
    }

    fn serialize_f32(self, v: f32) -> Result<S::Ok, S::Error> {
        if !v.is_finite() {
            return Err(refuse(f64::from(v)));
        }
        self.0.serialize_f32(v)
    }

    fn serialize_f64(self, v: f64) -> Result<S::Ok, S::Error> {
        if !v.is_finite() {
            return Err(refuse(v));
        }
        self.0.serialize_f64(v)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<S::Ok, S::Error> {
        self.0.serialize_some(&Finite(value))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0.serialize_newtype_struct(name, &Finite(value))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<S::Ok, S::Error> {
        self.0
            .serialize_newtype_variant(name, index, variant, &Finite(value))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        self.0.serialize_seq(len).map(Checked)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        self.0.serialize_tuple(len).map(Checked)
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        self.0.serialize_tuple_struct(name, len).map(Checked)
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        self.0
            .serialize_tuple_variant(name, index, variant, len)
            .map(Checked)
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        self.0.serialize_map(len).map(Checked)
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        self.0.serialize_struct(name, len).map(Checked)
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        self.0
            .serialize_struct_variant(name, index, variant, len)
            .map(Checked)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// The compound serializers whose values come one by one: each value is
/// checked on its way to the inner one.
macro_rules! checked_values {
    ($($compound:ident::$method:ident;)*) => {
        $(impl<C: $compound> $compound for Checked<C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
                self.0.$method(&Finite(value))
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.0.end()
            }
        })*
    };
}

checked_values! {
    SerializeSeq::serialize_element;
    SerializeTuple::serialize_element;
    SerializeTupleStruct::serialize_field;
    SerializeTupleVariant::serialize_field;
}

/// The compound serializers whose values come with a field name.
macro_rules! checked_fields {
    ($($compound:ident;)*) => {
        $(impl<C: $compound> $compound for Checked<C> {
            type Ok = C::Ok;
            type Error = C::Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), C::Error> {
                self.0.serialize_field(key, &Finite(value))
            }

            fn skip_field(&mut self, key: &'static str) -> Result<(), C::Error> {
                self.0.skip_field(key)
            }

            fn end(self) -> Result<C::Ok, C::Error> {
                self.0.end()
            }
        })*
    };
}

checked_fields! {
    SerializeStruct;
    SerializeStructVariant;
}

impl<C: SerializeMap> SerializeMap for Checked<C> {
    type Ok = C::Ok;
    type Error = C::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), C::Error> {
        self.0.serialize_key(&Finite(key))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), C::Error> {
        self.0.serialize_value(&Finite(value))
    }

    fn serialize_entry<K: Serialize + ?Sized, V: Serialize + ?Sized>(
        &mut self,
        key: &K,
        value: &V,
    ) -> Result<(), C::Error> {
        self.0.serialize_entry(&Finite(key), &Finite(value))
    }

    fn end(self) -> Result<C::Ok, C::Error> {
        self.0.end()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;
    use serde_json::json;
    use serde_json::value::RawValue;

    use super::Finite;

    fn text(value: &impl Serialize) -> Result<String, String> {
        serde_json::to_string(&Finite(value)).map_err(|e| e.to_string())
    }

    #[derive(Serialize)]
    enum Shape {
        Point(f64),
        Pair(f64, f64),
        Named { x: f64 },
    }

    #[derive(Serialize)]
    struct Reading {
        label: &'static str,
        value: Option<f64>,
        history: Vec<f32>,
        raw: Box<RawValue>,
    }

    #[test]
    fn finite_values_serialize_exactly_as_serde_json_does() {
        let reading = Reading {
            label: "t",
            value: Some(1.5),
            history: vec![0.25, -3.0],
            raw: RawValue::from_string("[1,{\"a\":null}]".to_owned()).expect("raw"),
        };
        assert_eq!(
            text(&reading),
            Ok(serde_json::to_string(&reading).expect("plain"))
        );
        let value = json!({"n": 1, "f": 2.5, "deep": [[{"x": -0.0}]], "none": null});
        assert_eq!(text(&value), Ok(value.to_string()));
        let shapes = (
            Shape::Point(1.0),
            Shape::Pair(2.0, 3.0),
            Shape::Named { x: 4.0 },
        );
        assert_eq!(
            text(&shapes),
            Ok(serde_json::to_string(&shapes).expect("plain"))
        );
    }

    #[test]
    fn a_non_finite_float_anywhere_is_refused() {
        let map: BTreeMap<&str, f64> = [("ratio", f64::INFINITY)].into();
        let refused: Vec<Result<String, String>> = vec![
            text(&f64::NAN),
            text(&f32::NEG_INFINITY),
            text(&Some(f64::NAN)),
            text(&vec![1.0, f64::NAN]),
            text(&(1, f64::INFINITY)),
            text(&map),
            text(&Shape::Point(f64::NAN)),
            text(&Shape::Pair(0.0, f64::NAN)),
            text(&Shape::Named { x: f64::NAN }),
            text(&Reading {
                label: "t",
                value: None,
                history: vec![f32::NAN],
                raw: RawValue::from_string("1".to_owned()).expect("raw"),
            }),
        ];
        for (n, outcome) in refused.into_iter().enumerate() {
            let error = outcome.expect_err(&format!("case {n} is refused"));
            assert!(error.contains("not a JSON number"), "case {n}: {error}");
        }
    }
}
