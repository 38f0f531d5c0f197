//! Bytes on the wire: length-prefixed frames, and the request/response envelopes inside them (no I/O).

use bytes::Bytes;
use serde::Serialize;
use tokio_util::codec::{LengthDelimitedCodec, length_delimited::LengthDelimitedCodecError};

use super::error::{RequestError, WireError};

/// Codec for incoming requests: a 4-byte big-endian length, then the body.
/// The codec compares the length prefix with `max_request_bytes` before it
/// reserves anything, so a huge prefix costs nothing.
pub fn request_codec(max_request_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max_request_bytes)
        .new_codec()
}

/// Codec for responses (and for the client's reading side): the same framing,
/// bounded only by the u32 length field. Results are bounded by the output caps.
pub fn response_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(u32::MAX as usize)
        .new_codec()
}

/// True when a read error is the codec refusing an oversized length prefix.
pub fn is_frame_too_large(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>())
}

/// A request envelope that parsed: `{"id", "method", "params"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Echoed in the response so pipelined answers can be matched.
    pub id: u64,
    /// e.g. `exec.run`.
    pub method: String,
    /// The MessagePack bytes of the `params` map, still encoded (a slice of
    /// the frame, no copy); empty when the request has none. Decoded straight
    /// into the method's typed params, never into a generic value tree.
    pub params: Bytes,
}

/// A frame that could not be used as a request; `id` is set when it could be read.
#[derive(Debug, Clone, PartialEq)]
pub struct BadFrame {
    pub id: Option<u64>,
    pub error: RequestError,
}

fn bad(id: Option<u64>, message: impl Into<String>) -> BadFrame {
    BadFrame {
        id,
        error: RequestError::InvalidRequest(message.into()),
    }
}

/// Parses one frame body into a request envelope.
///
/// 1. Walk the whole body once ([`skip_value`]): it must be exactly one
///    well-formed MessagePack value. Nothing is allocated, so a frame of a
///    million tiny elements costs no more memory than its own bytes.
/// 2. The value must be a map; find `id`, `method` and `params` among its keys.
/// 3. Decode only `id` (a uint) and `method` (a str); keep `params` as bytes.
pub fn parse_request(body: &Bytes) -> Result<Request, BadFrame> {
    let end = skip_value(body, 0)
        .map_err(|e| bad(None, format!("frame is not valid MessagePack: {e}")))?;
    if end != body.len() {
        return Err(bad(
            None,
            format!(
                "frame holds {} bytes after its MessagePack value",
                body.len() - end
            ),
        ));
    }
    let (entries, mut pos) =
        map_header(body, 0).ok_or_else(|| bad(None, "a request must be a MessagePack map"))?;
    let (mut id, mut method, mut params) = (None, None, None);
    for _ in 0..entries {
        let key_end = skip_value(body, pos).map_err(|e| bad(None, e))?;
        let key = rmp::decode::read_str_from_slice(&body[pos..key_end])
            .ok()
            .map(|(k, _)| k);
        let value_end = skip_value(body, key_end).map_err(|e| bad(None, e))?;
        let value = key_end..value_end;
        match key {
            Some("id") => id = Some(value),
            Some("method") => method = Some(value),
            Some("params") => params = Some(value),
            _ => {}
        }
        pos = value_end;
    }
    let id = id
        .and_then(|r| rmp::decode::read_int::<u64, _>(&mut &body[r]).ok())
        .ok_or_else(|| bad(None, "request `id` is missing or not an unsigned integer"))?;
    let method = method
        .and_then(|r| {
            rmp::decode::read_str_from_slice(&body[r])
                .ok()
                .map(|(m, _)| m.to_string())
        })
        .ok_or_else(|| bad(Some(id), "request `method` is missing or not a string"))?;
    let params = match params {
        None => Bytes::new(),
        Some(r) if body[r.start] == 0xc0 => Bytes::new(),
        Some(r) if map_header(body, r.start).is_some() => body.slice(r),
        Some(_) => return Err(bad(Some(id), "request `params` must be a map")),
    };
    Ok(Request { id, method, params })
}

/// The entry count of a map whose header starts at `pos`, and where its first key starts.
fn map_header(buf: &[u8], pos: usize) -> Option<(u64, usize)> {
    let marker = *buf.get(pos)?;
    match marker {
        0x80..=0x8f => Some((u64::from(marker & 0x0f), pos + 1)),
        0xde => Some((be(buf, pos + 1, 2)?, pos + 3)),
        0xdf => Some((be(buf, pos + 1, 4)?, pos + 5)),
        _ => None,
    }
}

/// A big-endian unsigned integer of `n` bytes at `pos`.
fn be(buf: &[u8], pos: usize, n: usize) -> Option<u64> {
    let bytes = buf.get(pos..pos + n)?;
    Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// Returns the offset just past the MessagePack value starting at `pos`.
/// Iterative (a count of values still to skip, no recursion, no allocation),
/// so neither deep nesting nor huge declared lengths cost anything: every
/// declared element must still be present in the buffer.
pub fn skip_value(buf: &[u8], mut pos: usize) -> Result<usize, &'static str> {
    const TRUNCATED: &str = "truncated value";
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let marker = *buf.get(pos).ok_or(TRUNCATED)?;
        pos += 1;
        let len = |n: usize| be(buf, pos, n).map(|l| l as usize).ok_or(TRUNCATED);
        let skip: usize = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 0,
            0x80..=0x8f => {
                pending += 2 * u64::from(marker & 0x0f);
                0
            }
            0x90..=0x9f => {
                pending += u64::from(marker & 0x0f);
                0
            }
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xc4 | 0xd9 => 1 + len(1)?,
            0xc5 | 0xda => 2 + len(2)?,
            0xc6 | 0xdb => 4 + len(4)?,
            0xc7 => 1 + 1 + len(1)?,
            0xc8 => 2 + 1 + len(2)?,
            0xc9 => 4 + 1 + len(4)?,
            0xcc | 0xd0 => 1,
            0xcd | 0xd1 => 2,
            0xca | 0xce | 0xd2 => 4,
            0xcb | 0xcf | 0xd3 => 8,
            0xd4 => 2,
            0xd5 => 3,
            0xd6 => 5,
            0xd7 => 9,
            0xd8 => 17,
            0xdc => {
                pending += len(2)? as u64;
                2
            }
            0xdd => {
                pending += len(4)? as u64;
                4
            }
            0xde => {
                pending += 2 * len(2)? as u64;
                2
            }
            0xdf => {
                pending += 2 * len(4)? as u64;
                4
            }
            0xc1 => return Err("byte 0xc1 is never used in MessagePack"),
        };
        pos = pos
            .checked_add(skip)
            .filter(|p| *p <= buf.len())
            .ok_or(TRUNCATED)?;
    }
    Ok(pos)
}

#[derive(Serialize)]
struct SuccessFrame<'a, T: Serialize> {
    id: u64,
    result: &'a T,
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    id: Option<u64>,
    error: &'a WireError,
}

/// Encodes a success response body.
pub fn encode_result<T: Serialize>(id: u64, result: &T) -> Bytes {
    match rmp_serde::to_vec_named(&SuccessFrame { id, result }) {
        Ok(body) => Bytes::from(body),
        // Our result types always serialize; should one not, the client still gets an answer.
        Err(e) => encode_error(
            Some(id),
            &RequestError::Internal(format!("cannot encode result: {e}")),
        ),
    }
}

/// Encodes an event frame of request `id`: `{"id", "event", ...}`.
pub fn encode_event(id: u64, event: &super::Event) -> Bytes {
    let frame = super::EventFrame {
        id,
        event: event.clone(),
    };
    Bytes::from(rmp_serde::to_vec_named(&frame).expect("an event always encodes"))
}

/// Encodes an error response body.
pub fn encode_error(id: Option<u64>, error: &RequestError) -> Bytes {
    encode_wire_error(id, &error.to_wire())
}

/// Encodes an already-mapped error.
pub fn encode_wire_error(id: Option<u64>, error: &WireError) -> Bytes {
    let body = rmp_serde::to_vec_named(&ErrorFrame { id, error })
        .expect("an error frame of strings and integers always encodes");
    Bytes::from(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    fn map(entries: Vec<(&str, rmpv::Value)>) -> Bytes {
        let v = rmpv::Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        Bytes::from(out)
    }

    #[test]
    fn a_well_formed_request_parses() {
        let body = map(vec![("id", 7.into()), ("method", "system.ping".into())]);
        let req = parse_request(&body).unwrap();
        assert_eq!(req.id, 7);
        assert_eq!(req.method, "system.ping");
        assert!(req.params.is_empty());
    }

    #[test]
    fn garbage_is_invalid_without_id() {
        let err = parse_request(&Bytes::from_static(&[0xc1, 0x00])).unwrap_err();
        assert_eq!(err.id, None);
        assert_eq!(err.error.code(), "INVALID_REQUEST");
    }

    #[test]
    fn non_map_is_invalid() {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &rmpv::Value::from(5)).unwrap();
        assert_eq!(parse_request(&Bytes::from(out)).unwrap_err().id, None);
    }

    #[test]
    fn string_id_is_not_usable() {
        let body = map(vec![
            ("id", "seven".into()),
            ("method", "system.ping".into()),
        ]);
        let err = parse_request(&body).unwrap_err();
        assert_eq!(err.id, None);
        assert!(err.error.to_string().contains("id"));
    }

    #[test]
    fn missing_method_keeps_the_id() {
        let body = map(vec![("id", 9.into())]);
        let err = parse_request(&body).unwrap_err();
        assert_eq!(err.id, Some(9));
    }

    #[test]
    fn params_must_be_a_map() {
        let body = map(vec![
            ("id", 1.into()),
            ("method", "x".into()),
            ("params", rmpv::Value::Array(vec![])),
        ]);
        assert_eq!(parse_request(&body).unwrap_err().id, Some(1));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut body = map(vec![("id", 1.into()), ("method", "x".into())]).to_vec();
        body.push(0xc0);
        assert!(parse_request(&Bytes::from(body)).is_err());
    }

    #[test]
    fn params_stay_encoded_and_unknown_keys_are_skipped() {
        let params = rmpv::Value::Map(vec![("command".into(), "ls".into())]);
        let body = map(vec![
            ("extra", rmpv::Value::Array(vec![rmpv::Value::Nil; 3])),
            ("params", params.clone()),
            ("method", "exec.run".into()),
            ("id", 5.into()),
        ]);
        let req = parse_request(&body).unwrap();
        let mut expected = Vec::new();
        rmpv::encode::write_value(&mut expected, &params).unwrap();
        assert_eq!(&req.params[..], &expected[..]);
        assert_eq!((req.id, req.method.as_str()), (5, "exec.run"));
    }

    #[test]
    fn skip_value_agrees_with_a_real_encoder_on_every_kind() {
        let v = rmpv::Value::Array(vec![
            rmpv::Value::Nil,
            true.into(),
            (-3).into(),
            300.into(),
            70_000.into(),
            u64::MAX.into(),
            (-40_000i64).into(),
            1.5f32.into(),
            2.5f64.into(),
            "s".repeat(40).into(),
            "t".repeat(300).into(),
            rmpv::Value::Binary(vec![1; 70_000]),
            rmpv::Value::Ext(3, vec![1, 2, 3, 4]),
            rmpv::Value::Ext(3, vec![9; 20]),
            rmpv::Value::Array(vec![rmpv::Value::Nil; 20]),
            rmpv::Value::Map(vec![("k".into(), rmpv::Value::Map(vec![]))]),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        assert_eq!(skip_value(&out, 0), Ok(out.len()));
        for cut in [1, 10, out.len() / 2, out.len() - 1] {
            assert!(skip_value(&out[..cut], 0).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn a_huge_declared_length_is_just_truncated() {
        // array32 claiming 4 billion elements, with none present.
        assert!(skip_value(&[0xdd, 0xff, 0xff, 0xff, 0xff], 0).is_err());
        // 100k nested arrays: no recursion, no stack overflow.
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert_eq!(skip_value(&deep, 0), Ok(deep.len()));
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocation() {
        let mut codec = request_codec(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0][..]);
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(is_frame_too_large(&err));
        assert!(
            buf.capacity() < 1024 * 1024,
            "no body-sized buffer was reserved"
        );
    }

    #[test]
    fn partial_frame_needs_more_bytes() {
        let mut codec = request_codec(1024);
        let mut buf = BytesMut::from(&[0, 0, 0, 10, 1, 2][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn frames_round_trip() {
        let mut codec = response_codec();
        let mut buf = BytesMut::new();
        let body = encode_result(3, &true);
        codec.encode(body.clone(), &mut buf).unwrap();
        assert_eq!(&buf[..4], &(body.len() as u32).to_be_bytes());
        let decoded = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&decoded[..], &body[..]);
    }
}
