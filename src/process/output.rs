//! Capped capture of one output stream: keeps head, tail or both within the cap, counts and discards the rest.

use std::collections::VecDeque;

/// What to keep of a stream longer than its cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeepOutput {
    /// The first bytes.
    #[default]
    Head,
    /// The last bytes.
    Tail,
    /// The first half and the last half of the cap; the middle is dropped.
    Both,
}

/// What was captured of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    /// The kept bytes: head, then tail.
    pub bytes: Vec<u8>,
    /// How many bytes the stream carried in all.
    pub total: u64,
    /// Whether bytes were dropped.
    pub truncated: bool,
}

/// Bytes kept of one stream. Memory is bounded by `cap` whatever the command
/// writes: past the cap, bytes are counted and dropped, never buffered, and
/// the pipe keeps being read so the writer never blocks on a full pipe.
#[derive(Debug)]
pub struct CappedOutput {
    head: Vec<u8>,
    head_cap: usize,
    tail: VecDeque<u8>,
    tail_cap: usize,
    total: u64,
}

impl CappedOutput {
    /// `cap` bytes in all, split by `keep`: head only, tail only, or half and half.
    pub fn new(cap: usize, keep: KeepOutput) -> Self {
        let (head_cap, tail_cap) = match keep {
            KeepOutput::Head => (cap, 0),
            KeepOutput::Tail => (0, cap),
            KeepOutput::Both => (cap / 2, cap - cap / 2),
        };
        CappedOutput {
            head: Vec::new(),
            head_cap,
            tail: VecDeque::new(),
            tail_cap,
            total: 0,
        }
    }

    /// Takes the next chunk read from the stream.
    pub fn push(&mut self, mut chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.head_cap - self.head.len();
        if room > 0 {
            let take = room.min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
        }
        if self.tail_cap == 0 || chunk.is_empty() {
            return;
        }
        if chunk.len() >= self.tail_cap {
            self.tail.clear();
            self.tail.extend(&chunk[chunk.len() - self.tail_cap..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(self.tail_cap);
        self.tail.drain(..overflow);
        self.tail.extend(chunk);
    }

    /// How many bytes the stream carried in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > (self.head.len() + self.tail.len()) as u64
    }

    /// What was captured, once the stream ended.
    pub fn finish(self) -> Captured {
        Captured {
            truncated: self.truncated(),
            total: self.total,
            bytes: self.into_bytes(),
        }
    }

    /// The kept bytes: head, then tail.
    pub fn into_bytes(self) -> Vec<u8> {
        let mut out = self.head;
        out.extend(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(cap: usize, keep: KeepOutput, chunks: &[&[u8]]) -> (Vec<u8>, bool, u64) {
        let mut out = CappedOutput::new(cap, keep);
        for c in chunks {
            out.push(c);
        }
        let (t, n) = (out.truncated(), out.total());
        (out.into_bytes(), t, n)
    }

    #[test]
    fn under_the_cap_everything_is_kept() {
        for keep in [KeepOutput::Head, KeepOutput::Tail, KeepOutput::Both] {
            assert_eq!(
                capture(10, keep, &[b"abc", b"def"]),
                (b"abcdef".to_vec(), false, 6)
            );
        }
    }

    #[test]
    fn head_keeps_the_first_bytes() {
        assert_eq!(
            capture(4, KeepOutput::Head, &[b"abc", b"defgh"]),
            (b"abcd".to_vec(), true, 8)
        );
    }

    #[test]
    fn tail_keeps_the_last_bytes_across_chunks() {
        assert_eq!(
            capture(4, KeepOutput::Tail, &[b"abc", b"def", b"g"]),
            (b"defg".to_vec(), true, 7)
        );
        assert_eq!(
            capture(4, KeepOutput::Tail, &[b"abcdefgh"]),
            (b"efgh".to_vec(), true, 8)
        );
    }

    #[test]
    fn both_keeps_first_and_last_halves() {
        assert_eq!(
            capture(4, KeepOutput::Both, &[b"abcdef", b"ghij"]),
            (b"abij".to_vec(), true, 10)
        );
        assert_eq!(
            capture(5, KeepOutput::Both, &[b"0123456789"]),
            (b"01789".to_vec(), true, 10)
        );
    }

    #[test]
    fn exactly_the_cap_is_not_truncated() {
        assert_eq!(
            capture(4, KeepOutput::Both, &[b"abcd"]),
            (b"abcd".to_vec(), false, 4)
        );
    }
}
