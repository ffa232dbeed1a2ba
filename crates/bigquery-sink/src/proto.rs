//! The pure half of a Storage Write API append: the row's protobuf
//! descriptor, built from the table's columns, and one record → one
//! serialized row.
//!
//! The Write API takes rows as protobuf messages described by a
//! `DescriptorProto` sent with the first request of a connection. The
//! message here is proto2 with every field `optional`, so an absent field is
//! NULL, as BigQuery documents. Field numbers are the columns' positions in
//! [`COLUMNS`] plus one. Types follow BigQuery's conversion table: TIMESTAMP
//! as `int64` microseconds since the epoch, JSON and STRING as `string`,
//! INT64 as `int64`.

use chrono::{DateTime, Utc};
use prost::bytes::BufMut;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto};

use sink_core::Record;

use crate::decode::Columns;
use crate::table::{Kind, COLUMNS};

/// The message name in the descriptor (any valid identifier).
const MESSAGE: &str = "UserLogRow";

/// The descriptor of the rows [`write`] encodes.
pub fn descriptor() -> DescriptorProto {
    DescriptorProto {
        name: Some(MESSAGE.to_owned()),
        field: COLUMNS
            .iter()
            .zip(1..)
            .map(|(column, number)| FieldDescriptorProto {
                name: Some(column.name.to_owned()),
                number: Some(number),
                label: Some(Label::Optional.into()),
                r#type: Some(wire_type(column.kind).into()),
                ..FieldDescriptorProto::default()
            })
            .collect(),
        ..DescriptorProto::default()
    }
}

fn wire_type(kind: Kind) -> Type {
    match kind {
        Kind::Timestamp | Kind::Int64 => Type::Int64,
        Kind::String | Kind::Json => Type::String,
    }
}

/// Field number of a column, by name.
const fn field(name: &str) -> u32 {
    let mut i = 0;
    while i < COLUMNS.len() {
        if const_eq(COLUMNS[i].name, name) {
            return i as u32 + 1;
        }
        i += 1;
    }
    panic!("not a column")
}

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Checked at compile time: a renamed column fails the build here.
const EVENT_TIME: u32 = field("event_time");
const INFO: u32 = field("info");
const USER_ID: u32 = field("user_id");
const KEYWORD: u32 = field("keyword");
const MOVIE_ID: u32 = field("movie_id");
const HOST: u32 = field("host");
const PAYLOAD: u32 = field("payload");
const KAFKA_TOPIC: u32 = field("kafka_topic");
const KAFKA_PARTITION: u32 = field("kafka_partition");
const KAFKA_OFFSET: u32 = field("kafka_offset");
const INGESTED_AT: u32 = field("ingested_at");

/// A TIMESTAMP value as the Write API takes it: microseconds since the
/// epoch (BigQuery's precision; finer digits are dropped, as insertAll's
/// text form drops them).
pub fn micros(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

/// Appends the serialized row of one decoded record to `out`. NULL columns
/// are left out. `ingested_at` is the write's time in microseconds.
pub fn write(out: &mut Vec<u8>, record: &Record, columns: &Columns, ingested_at: i64) {
    int64(out, EVENT_TIME, micros(columns.event_time));
    let optional = [
        (INFO, &columns.info),
        (USER_ID, &columns.user_id),
        (KEYWORD, &columns.keyword),
        (MOVIE_ID, &columns.movie_id),
        (HOST, &columns.host),
    ];
    for (tag, value) in optional {
        if let Some(value) = value {
            bytes(out, tag, value.as_bytes());
        }
    }
    // Decoding checked the payload is UTF-8 JSON: its bytes are the string.
    bytes(out, PAYLOAD, &record.payload);
    bytes(out, KAFKA_TOPIC, record.topic.as_bytes());
    int64(out, KAFKA_PARTITION, i64::from(record.partition));
    int64(out, KAFKA_OFFSET, record.offset);
    int64(out, INGESTED_AT, ingested_at);
}

fn int64(out: &mut Vec<u8>, tag: u32, value: i64) {
    encode_key(tag, WireType::Varint, out);
    // int64 is encoded as its two's complement, as u64.
    #[allow(clippy::cast_sign_loss)]
    encode_varint(value as u64, out);
}

fn bytes(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.put_slice(value);
}

/// What one row adds to an `AppendRowsRequest`: its bytes inside
/// `ProtoRows.serialized_rows` (a tag byte and a length prefix).
pub fn framed_len(row_len: usize) -> usize {
    1 + encoded_len_varint(row_len as u64) + row_len
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use chrono::TimeZone;
    use gcp_bigquery_client::google::cloud::bigquery::storage::v1::ProtoRows;
    use prost::Message as _;

    use super::*;

    /// The row message as a test reads it back: the generated decoder of
    /// the same field numbers and types, written out by hand.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Decoded {
        #[prost(int64, optional, tag = "1")]
        event_time: Option<i64>,
        #[prost(string, optional, tag = "2")]
        info: Option<String>,
        #[prost(string, optional, tag = "3")]
        user_id: Option<String>,
        #[prost(string, optional, tag = "4")]
        keyword: Option<String>,
        #[prost(string, optional, tag = "5")]
        movie_id: Option<String>,
        #[prost(string, optional, tag = "6")]
        host: Option<String>,
        #[prost(string, optional, tag = "7")]
        payload: Option<String>,
        #[prost(string, optional, tag = "8")]
        kafka_topic: Option<String>,
        #[prost(int64, optional, tag = "9")]
        kafka_partition: Option<i64>,
        #[prost(int64, optional, tag = "10")]
        kafka_offset: Option<i64>,
        #[prost(int64, optional, tag = "11")]
        ingested_at: Option<i64>,
    }

    fn record(payload: &str, offset: i64) -> Record {
        Record {
            topic: Arc::from("user2"),
            partition: 2,
            offset,
            timestamp_ms: None,
            key: None,
            payload: payload.as_bytes().to_vec(),
            headers: None,
        }
    }

    #[test]
    fn the_descriptor_has_every_column_in_table_order() {
        let descriptor = descriptor();
        let described: Vec<(&str, i32, Type)> = descriptor
            .field
            .iter()
            .map(|f| (f.name(), f.number(), f.r#type()))
            .collect();
        assert_eq!(
            described,
            [
                ("event_time", 1, Type::Int64),
                ("info", 2, Type::String),
                ("user_id", 3, Type::String),
                ("keyword", 4, Type::String),
                ("movie_id", 5, Type::String),
                ("host", 6, Type::String),
                ("payload", 7, Type::String),
                ("kafka_topic", 8, Type::String),
                ("kafka_partition", 9, Type::Int64),
                ("kafka_offset", 10, Type::Int64),
                ("ingested_at", 11, Type::Int64),
            ]
        );
        assert!(descriptor
            .field
            .iter()
            .all(|f| f.label() == Label::Optional));
    }

    #[test]
    fn every_column_type_round_trips() {
        let payload = r#"{"info":"search","keyword":"기생충 \"quoted\"","user_id":7,"x":[1]}"#;
        let columns = Columns {
            event_time: Utc
                .timestamp_opt(1_714_566_896, 789_123_999)
                .single()
                .unwrap(),
            info: Some("search".into()),
            user_id: Some("7".into()),
            keyword: Some("기생충 \"quoted\"".into()),
            movie_id: None,
            host: Some(String::new()),
            // Offsets above 2^32 and a negative time take every varint width.
        };
        let record = record(payload, 5_000_000_000);
        let mut out = Vec::new();
        write(&mut out, &record, &columns, -1);
        let decoded = Decoded::decode(out.as_slice()).unwrap();
        assert_eq!(
            decoded,
            Decoded {
                event_time: Some(1_714_566_896_789_123),
                info: Some("search".into()),
                user_id: Some("7".into()),
                keyword: Some("기생충 \"quoted\"".into()),
                movie_id: None,
                host: Some(String::new()),
                payload: Some(payload.into()),
                kafka_topic: Some("user2".into()),
                kafka_partition: Some(2),
                kafka_offset: Some(5_000_000_000),
                ingested_at: Some(-1),
            }
        );
    }

    #[test]
    fn rows_frame_as_prost_frames_them() {
        for len in [0, 1, 127, 128, 16_383, 16_384, 3_000_000] {
            let rows = ProtoRows {
                serialized_rows: vec![vec![0; len]],
            };
            assert_eq!(framed_len(len), rows.encoded_len(), "{len}");
        }
    }
}
