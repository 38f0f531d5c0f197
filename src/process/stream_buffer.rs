//! What the daemon holds of one output stream of a command, addressed by stream offsets: the head it will keep and a window of the last bytes (read by `exec.read`, streamed as events, cut to the kept output at the end).
//!
//! While the command runs, a stream holds at most `2 × cap` bytes: the head
//! its `keep` mode returns in the result (`cap` for head, `cap / 2` for
//! both, nothing for tail) and the last `cap` bytes written (the window that
//! `exec.read` and streaming read from). When the command ends,
//! [`StreamBuffer::finish`] drops what the result does not keep, so a
//! finished command retains exactly its kept output. Past the cap, bytes are
//! counted and dropped, never buffered: memory is bounded whatever the
//! command writes, and the pipe is always read, so the writer never blocks.

use std::collections::VecDeque;

/// What to keep of a stream longer than its cap (the process layer's twin of the wire's `keep_output`).
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

use KeepOutput as Keep;

/// Bytes read from a stream at some offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Stream offset of `data[0]`; larger than asked when bytes were not retained.
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Chunk {
    /// The offset to read from next.
    pub fn next(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// One output stream of one command.
#[derive(Debug)]
pub struct StreamBuffer {
    cap: usize,
    keep: Keep,
    /// Bytes `[0, head.len())` of the stream.
    head: Vec<u8>,
    head_cap: usize,
    /// The last bytes of the stream: `[total - window.len(), total)`.
    window: VecDeque<u8>,
    window_cap: usize,
    total: u64,
    finished: bool,
}

impl StreamBuffer {
    /// A stream that keeps `cap` bytes for the result as `keep` says.
    pub fn new(cap: usize, keep: Keep) -> StreamBuffer {
        let head_cap = match keep {
            Keep::Head => cap,
            Keep::Tail => 0,
            Keep::Both => cap / 2,
        };
        StreamBuffer {
            cap,
            keep,
            head: Vec::new(),
            head_cap,
            window: VecDeque::new(),
            window_cap: cap,
            total: 0,
            finished: false,
        }
    }

    /// Drops every byte held (the command's retained output was evicted to
    /// make room under the memory budget); the total stays.
    pub fn clear(&mut self) {
        self.head = Vec::new();
        self.window = VecDeque::new();
        self.finished = true;
    }

    /// Takes the next bytes the command wrote.
    pub fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.head_cap.saturating_sub(self.head.len());
        if room > 0 {
            self.head.extend_from_slice(&chunk[..room.min(chunk.len())]);
        }
        if self.window_cap == 0 {
            return;
        }
        if chunk.len() >= self.window_cap {
            self.window.clear();
            self.window.extend(&chunk[chunk.len() - self.window_cap..]);
            return;
        }
        let overflow = (self.window.len() + chunk.len()).saturating_sub(self.window_cap);
        self.window.drain(..overflow);
        self.window.extend(chunk);
    }

    /// How many bytes the stream carried in all (the offset of its end).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes held now (what this stream costs in memory).
    pub fn held(&self) -> usize {
        self.head.len() + self.window.len()
    }

    /// The largest number of bytes this stream can ever hold (its reservation).
    pub fn max_held(cap: usize) -> usize {
        2 * cap
    }

    /// Whether the result drops bytes of this stream.
    pub fn truncated(&self) -> bool {
        self.total > self.cap as u64
    }

    /// How many of the window's last bytes the result keeps (after the head, never twice).
    fn tail_kept(&self) -> usize {
        let tail_keep = match self.keep {
            Keep::Head => 0,
            Keep::Tail => self.cap,
            Keep::Both => self.cap - self.cap / 2,
        };
        let after_head = self.total.saturating_sub(self.head.len() as u64);
        tail_keep
            .min(usize::try_from(after_head).unwrap_or(usize::MAX))
            .min(self.window.len())
    }

    /// Drops what the result does not keep: what a finished command retains.
    /// Called a little after the end (not at it), so a streaming reader
    /// that keeps up still gets the last bytes from the window.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        let drop = self.window.len() - self.tail_kept();
        self.window.drain(..drop);
        self.window.shrink_to_fit();
        self.head.shrink_to_fit();
        self.window_cap = 0;
    }

    /// Where, in [`Self::kept`], bytes were dropped: after the head (head and
    /// both), or at its start (tail); `None` when nothing was dropped.
    pub fn cut_at(&self) -> Option<u64> {
        if !self.truncated() {
            return None;
        }
        Some(match self.keep {
            Keep::Tail => 0,
            Keep::Head | Keep::Both => self.head.len() as u64,
        })
    }

    /// The output the result carries: the head, then the kept tail (whether
    /// or not [`Self::finish`] has cut the stream yet).
    pub fn kept(&self) -> Vec<u8> {
        let skip = self.window.len() - self.tail_kept();
        let mut out = Vec::with_capacity(self.head.len() + self.window.len() - skip);
        out.extend_from_slice(&self.head);
        out.extend(self.window.range(skip..));
        out
    }

    /// Up to `max` retained bytes from `offset` on: from the first retained
    /// byte at or after it, up to the end of that retained run. At or past
    /// the end: nothing, at the end offset.
    pub fn read(&self, offset: u64, max: usize) -> Chunk {
        let head_end = self.head.len() as u64;
        let window_start = self.total - self.window.len() as u64;
        let (start, end) = if offset < head_end {
            // In the head; continue into the window when they touch.
            let end = if window_start <= head_end {
                self.total
            } else {
                head_end
            };
            (offset, end)
        } else if offset < window_start {
            // A gap: the bytes were not retained; resume where the window starts.
            (window_start, self.total)
        } else {
            (offset.min(self.total), self.total)
        };
        let len = usize::try_from(end - start).unwrap_or(usize::MAX).min(max);
        let mut data = Vec::with_capacity(len);
        let mut at = start;
        while data.len() < len {
            let want = len - data.len();
            if at < head_end {
                let from = at as usize;
                let n = want.min(self.head.len() - from);
                data.extend_from_slice(&self.head[from..from + n]);
                at += n as u64;
            } else {
                let from = (at - window_start) as usize;
                data.extend(self.window.range(from..from + want));
                at += want as u64;
            }
        }
        Chunk {
            offset: start,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fed(cap: usize, keep: Keep, chunks: &[&[u8]]) -> StreamBuffer {
        let mut s = StreamBuffer::new(cap, keep);
        for c in chunks {
            s.push(c);
        }
        s
    }

    #[test]
    fn kept_output_per_mode() {
        let data: &[&[u8]] = &[b"0123", b"456789"];
        for (keep, want) in [
            (Keep::Head, &b"0123"[..]),
            (Keep::Tail, &b"6789"[..]),
            (Keep::Both, &b"0189"[..]),
        ] {
            let mut s = fed(4, keep, data);
            assert!(s.truncated());
            assert_eq!(s.kept(), want, "{keep:?}, before the cut");
            let cut = match keep {
                Keep::Head => 4,
                Keep::Tail => 0,
                Keep::Both => 2,
            };
            assert_eq!(s.cut_at(), Some(cut), "{keep:?}");
            s.finish();
            assert_eq!(s.kept(), want, "{keep:?}");
            assert_eq!(
                s.held(),
                4,
                "{keep:?}: a finished stream holds only its kept output"
            );
            assert_eq!(s.total(), 10);
        }
        let mut short = fed(8, Keep::Both, &[b"abc"]);
        short.finish();
        assert_eq!(short.kept(), b"abc");
        assert!(!short.truncated());
        assert_eq!(short.cut_at(), None);
    }

    #[test]
    fn reads_show_gaps_by_offset() {
        // cap 4, head mode: head [0,4), window the last 4 bytes.
        let s = fed(4, Keep::Head, &[b"abcdefghij"]);
        assert_eq!(
            s.read(0, 100),
            Chunk {
                offset: 0,
                data: b"abcd".to_vec()
            }
        );
        // Offsets 4..6 were not retained: the read resumes at 6.
        let gap = s.read(4, 100);
        assert_eq!((gap.offset, gap.data.as_slice()), (6, &b"ghij"[..]));
        assert_eq!(gap.next(), 10);
        // At or past the end: nothing, at the end.
        let end = s.read(50, 100);
        assert_eq!((end.offset, end.data.len()), (10, 0));
        // `max` bounds a read; the next one goes on from there.
        let part = s.read(6, 3);
        assert_eq!((part.offset, part.data.as_slice()), (6, &b"ghi"[..]));
    }

    #[test]
    fn head_and_window_read_as_one_when_they_touch() {
        let s = fed(8, Keep::Head, &[b"abc", b"def"]);
        assert_eq!(s.read(1, 100).data, b"bcdef");
        let t = fed(8, Keep::Tail, &[b"abc", b"def"]);
        assert_eq!(t.read(0, 100).data, b"abcdef");
    }

    #[test]
    fn memory_is_bounded_whatever_is_written() {
        let mut s = StreamBuffer::new(1024, Keep::Both);
        let chunk = vec![7u8; 4096];
        for _ in 0..1000 {
            s.push(&chunk);
            assert!(s.held() <= StreamBuffer::max_held(1024));
        }
        assert_eq!(s.total(), 4096 * 1000);
    }

    /// The read contract against a model: every returned byte is the byte
    /// written at that offset, and every retained offset is reachable.
    #[test]
    fn reads_match_what_was_written() {
        let mut written = Vec::new();
        let mut s = StreamBuffer::new(16, Keep::Both);
        for i in 0..200u32 {
            let chunk: Vec<u8> = (0..(i % 7)).map(|j| (i * 7 + j) as u8).collect();
            written.extend_from_slice(&chunk);
            s.push(&chunk);
            let mut at = 0;
            while at < s.total() {
                let c = s.read(at, 5);
                assert!(c.offset >= at && !c.data.is_empty());
                let o = c.offset as usize;
                assert_eq!(c.data, written[o..o + c.data.len()]);
                at = c.next();
            }
        }
    }
}
