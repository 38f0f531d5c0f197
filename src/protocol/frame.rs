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
    /// A map, or `Nil` when absent.
    pub params: rmpv::Value,
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
pub fn parse_request(body: &[u8]) -> Result<Request, BadFrame> {
    let mut reader = body;
    let value = rmpv::decode::read_value(&mut reader)
        .map_err(|e| bad(None, format!("frame is not valid MessagePack: {e}")))?;
    if !reader.is_empty() {
        return Err(bad(
            None,
            format!(
                "frame holds {} bytes after its MessagePack value",
                reader.len()
            ),
        ));
    }
    let rmpv::Value::Map(entries) = value else {
        return Err(bad(None, "a request must be a MessagePack map"));
    };
    let field = |name: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v)
    };
    let id = match field("id") {
        Some(v) => v.as_u64(),
        None => None,
    };
    let Some(id) = id else {
        return Err(bad(
            None,
            "request `id` is missing or not an unsigned integer",
        ));
    };
    let method = match field("method").map(|m| m.as_str()) {
        Some(Some(m)) => m.to_string(),
        _ => return Err(bad(Some(id), "request `method` is missing or not a string")),
    };
    let params = match field("params") {
        None | Some(rmpv::Value::Nil) => rmpv::Value::Nil,
        Some(v @ rmpv::Value::Map(_)) => v.clone(),
        Some(_) => return Err(bad(Some(id), "request `params` must be a map")),
    };
    Ok(Request { id, method, params })
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

    fn map(entries: Vec<(&str, rmpv::Value)>) -> Vec<u8> {
        let v = rmpv::Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    #[test]
    fn a_well_formed_request_parses() {
        let body = map(vec![("id", 7.into()), ("method", "system.ping".into())]);
        let req = parse_request(&body).unwrap();
        assert_eq!(req.id, 7);
        assert_eq!(req.method, "system.ping");
        assert_eq!(req.params, rmpv::Value::Nil);
    }

    #[test]
    fn garbage_is_invalid_without_id() {
        let err = parse_request(&[0xc1, 0x00]).unwrap_err();
        assert_eq!(err.id, None);
        assert_eq!(err.error.code(), "INVALID_REQUEST");
    }

    #[test]
    fn non_map_is_invalid() {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &rmpv::Value::from(5)).unwrap();
        assert_eq!(parse_request(&out).unwrap_err().id, None);
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
        let mut body = map(vec![("id", 1.into()), ("method", "x".into())]);
        body.push(0xc0);
        assert!(parse_request(&body).is_err());
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
