//! The on-disk spool that holds usage rows the store could not take.
//!
//! When a batch cannot be written (database down, slow, or refusing), the writer
//! appends it here instead of holding it in memory, and replays it once the store
//! answers again. Rows are keyed by `request_id`, so a batch replayed twice (after a
//! crash between the insert and the acknowledgement) is stored once.
//!
//! # Format
//! A directory of segment files `usage-<seq>.spool`, appended in order. Each batch is
//! one frame: `len: u32 LE | crc32(payload): u32 LE | payload`, the payload a JSON
//! array of rows. A torn frame at the end of a segment (the process died while
//! writing it) fails its length or checksum and is cut off when the spool is opened;
//! everything before it is kept.
//!
//! # Durability
//! Appends are written at once and `fsync`ed at most every `fsync_interval` (by
//! [`Spool::sync_if_due`]) and always at shutdown. A crash of the machine can lose
//! the rows spooled within the last interval; a crash of the process loses none of
//! them (the kernel has the writes).
//!
//! # Bounds
//! The spool never grows past `max_bytes`; a batch that does not fit is refused and
//! the caller counts its rows as dropped. One process owns a spool directory at a
//! time (an exclusive lock on `LOCK`), so two nodes on one host cannot interleave.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::UsageRecord;

const FRAME_HEADER: usize = 8;
/// A new segment is started past this size, so replayed space is given back to the
/// file system segment by segment instead of only when the whole spool is empty.
const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// A frame larger than this is corruption, not a batch.
const MAX_FRAME: u32 = 256 * 1024 * 1024;

/// Why the spool refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("usage spool {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("usage spool {0} is in use by another process")]
    Locked(String),
    #[error("usage spool is full ({0} bytes)")]
    Full(u64),
    #[error("cannot encode usage rows: {0}")]
    Encode(String),
}

/// A segment file and how much of it is on disk.
#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    len: u64,
}

/// The spool directory. Used by the writer thread only, so it needs no locking.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    fsync_interval: Duration,
    /// Oldest first; the last one is the one appended to.
    segments: VecDeque<Segment>,
    writer: Option<File>,
    /// Read position in the oldest segment: everything before it has been replayed.
    read_offset: u64,
    /// Bytes appended and not yet replayed.
    pending: u64,
    dirty: bool,
    last_sync: Instant,
    _lock: File,
}

/// A batch read back from the spool, to be acknowledged once the store has it.
#[derive(Debug)]
pub struct SpooledBatch {
    /// The rows of the batch.
    pub rows: Vec<UsageRecord>,
    seq: u64,
    end: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, cutting off torn frames left by a crash.
    pub fn open(dir: &Path, max_bytes: u64, fsync_interval: Duration) -> Result<Spool, SpoolError> {
        let io_err = |source| SpoolError::Io {
            dir: dir.display().to_string(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(io_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked(dir.display().to_string()))
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("usage-"))
                .and_then(|n| n.strip_suffix(".spool"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let len = valid_prefix_len(&path).map_err(io_err)?;
            let on_disk = entry.metadata().map_err(io_err)?.len();
            if len < on_disk {
                log::warn!(
                    "usage spool: cutting {} bytes of a torn batch off {}",
                    on_disk - len,
                    path.display()
                );
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()))
                    .map_err(io_err)?;
            }
            segments.push(Segment { seq, path, len });
        }
        segments.sort_by_key(|s| s.seq);
        let pending = segments.iter().map(|s| s.len).sum();
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            fsync_interval,
            segments: segments.into(),
            writer: None,
            read_offset: 0,
            pending,
            dirty: false,
            last_sync: Instant::now(),
            _lock: lock,
        };
        Ok(spool)
    }

    /// Bytes spooled and not yet replayed.
    pub fn pending_bytes(&self) -> u64 {
        self.pending
    }

    /// Whether nothing waits to be replayed.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    fn io_err(&self, source: io::Error) -> SpoolError {
        SpoolError::Io {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Appends one batch as one frame. Refuses (and writes nothing) when the frame
    /// would take the spool past its bound.
    pub fn append(&mut self, rows: &[UsageRecord]) -> Result<(), SpoolError> {
        let payload = serde_json::to_vec(rows).map_err(|e| SpoolError::Encode(e.to_string()))?;
        let frame_len = (FRAME_HEADER + payload.len()) as u64;
        if self.pending + frame_len > self.max_bytes || payload.len() as u64 > MAX_FRAME as u64 {
            return Err(SpoolError::Full(self.max_bytes));
        }
        let mut frame = Vec::with_capacity(frame_len as usize);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let need_new = match self.segments.back() {
            None => true,
            Some(s) => self.writer.is_none() || s.len >= SEGMENT_BYTES,
        };
        if need_new {
            self.start_segment()?;
        }
        let (Some(file), Some(seg)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Err(self.io_err(io::Error::other("no open segment")));
        };
        if let Err(e) = file.write_all(&frame) {
            // Cut a partial frame off at once so later appends stay readable.
            let _ = file.set_len(seg.len);
            let _ = file.seek(SeekFrom::Start(seg.len));
            return Err(self.io_err(e));
        }
        seg.len += frame_len;
        self.pending += frame_len;
        self.dirty = true;
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        // Always a fresh file: a segment left by an earlier run may be read while
        // this run appends, and a single appender per file keeps offsets simple.
        let seq = self.segments.back().map_or(1, |s| s.seq + 1);
        let path = self.dir.join(format!("usage-{seq:020}.spool"));
        if let Some(f) = self.writer.as_ref() {
            f.sync_data().map_err(|e| self.io_err(e))?;
        }
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| self.io_err(e))?;
        // The directory entry must survive a crash too.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io_err(e))?;
        self.segments.push_back(Segment { seq, path, len: 0 });
        self.writer = Some(file);
        Ok(())
    }

    /// `fsync`s appended frames if the interval has passed since the last sync.
    pub fn sync_if_due(&mut self) -> Result<(), SpoolError> {
        if self.dirty && self.last_sync.elapsed() >= self.fsync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// `fsync`s appended frames now.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if let Some(f) = self.writer.as_ref() {
            f.sync_data().map_err(|e| self.io_err(e))?;
        }
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// The oldest batch not yet replayed, if any.
    ///
    /// A frame that decodes to no rows (written by a build whose row format this one
    /// cannot read) is logged and skipped rather than blocking the spool for ever.
    pub fn peek(&mut self) -> Result<Option<SpooledBatch>, SpoolError> {
        loop {
            let Some(seg) = self.segments.front() else {
                return Ok(None);
            };
            if self.read_offset >= seg.len {
                if self.front_is_appended_to() {
                    return Ok(None);
                }
                self.retire_front()?;
                continue;
            }
            let (seq, start) = (seg.seq, self.read_offset);
            let frame = read_frame(&seg.path, start).map_err(|e| self.io_err(e))?;
            let Some(payload) = frame else {
                // The rest of the segment is unreadable (cannot happen after open()'s
                // check unless the file was changed under us): give it up, loudly.
                log::error!(
                    "usage spool: unreadable batch in {} at {start}; skipping the rest of that file",
                    seg.path.display()
                );
                let rest = seg.len - start;
                self.pending = self.pending.saturating_sub(rest);
                self.read_offset = seg.len;
                continue;
            };
            let end = start + (FRAME_HEADER + payload.len()) as u64;
            match serde_json::from_slice::<Vec<UsageRecord>>(&payload) {
                Ok(rows) => return Ok(Some(SpooledBatch { rows, seq, end })),
                Err(e) => {
                    log::error!("usage spool: undecodable batch skipped: {e}");
                    self.pending = self.pending.saturating_sub(end - start);
                    self.read_offset = end;
                }
            }
        }
    }

    /// Marks `batch` replayed: the store committed it.
    pub fn ack(&mut self, batch: &SpooledBatch) -> Result<(), SpoolError> {
        let Some(seg) = self.segments.front() else {
            return Ok(());
        };
        if seg.seq != batch.seq || batch.end <= self.read_offset {
            return Ok(());
        }
        self.pending = self.pending.saturating_sub(batch.end - self.read_offset);
        self.read_offset = batch.end;
        if self.read_offset >= seg.len {
            if self.front_is_appended_to() {
                // Everything is replayed: start over in a fresh file instead of
                // growing this one for ever.
                self.writer = None;
            }
            self.retire_front()?;
        }
        Ok(())
    }

    /// Whether the oldest segment is also the one this run appends to.
    fn front_is_appended_to(&self) -> bool {
        self.segments.len() == 1 && self.writer.is_some()
    }

    fn retire_front(&mut self) -> Result<(), SpoolError> {
        if let Some(seg) = self.segments.pop_front() {
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err(e)),
            }
        }
        self.read_offset = 0;
        Ok(())
    }
}

/// Length of the longest prefix of `path` made of whole, checksummed frames.
fn valid_prefix_len(path: &Path) -> io::Result<u64> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut pos = 0usize;
    while let Some(payload_len) = frame_at(&data, pos) {
        pos += FRAME_HEADER + payload_len;
    }
    Ok(pos as u64)
}

/// A frame header's payload length and checksum; None for a length no batch has.
fn header(h: &[u8]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    (len <= MAX_FRAME).then_some((len as usize, crc))
}

/// The payload length of a whole, valid frame starting at `pos`.
fn frame_at(data: &[u8], pos: usize) -> Option<usize> {
    let (len, crc) = header(data.get(pos..pos + FRAME_HEADER)?)?;
    let start = pos + FRAME_HEADER;
    let payload = data.get(start..start + len)?;
    (crc32fast::hash(payload) == crc).then_some(len)
}

fn read_frame(path: &Path, offset: u64) -> io::Result<Option<Vec<u8>>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut head = [0u8; FRAME_HEADER];
    if f.read_exact(&mut head).is_err() {
        return Ok(None);
    }
    let Some((len, crc)) = header(&head) else {
        return Ok(None);
    };
    let mut payload = vec![0u8; len];
    if f.read_exact(&mut payload).is_err() || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(Some(payload))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::usage::TokenSource;

    fn row(i: usize) -> UsageRecord {
        UsageRecord {
            request_id: format!("req-{i}").into(),
            key_id: "key".into(),
            model: "gpt-4o-mini".into(),
            provider: "mock".into(),
            endpoint: "chat".into(),
            prompt_tokens: i as u64,
            cached_prompt_tokens: 0,
            completion_tokens: 2 * i as u64,
            cost_pusd: 7 * i as i64,
            input_price_micros: 150_000,
            output_price_micros: 600_000,
            status: 200,
            stream: i.is_multiple_of(2),
            token_source: TokenSource::Partial,
            started_at_ms: 1_700_000_000_000 + i as i64,
            latency_ms: 3,
            ttfb_ms: i.is_multiple_of(3).then_some(1),
            error: i
                .is_multiple_of(5)
                .then(|| "upstream \"reset\" ✗".to_string()),
        }
    }

    fn batch(from: usize, n: usize) -> Vec<UsageRecord> {
        (from..from + n).map(row).collect()
    }

    /// The segment files in `dir`.
    fn segments(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".spool"))
            .map(|e| e.path())
            .collect()
    }

    fn drain(s: &mut Spool) -> Vec<UsageRecord> {
        let mut out = Vec::new();
        while let Some(b) = s.peek().unwrap() {
            out.extend(b.rows.iter().cloned());
            s.ack(&b).unwrap();
        }
        out
    }

    #[test]
    fn append_peek_ack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
        assert!(s.is_empty());
        s.append(&batch(0, 3)).unwrap();
        s.append(&batch(3, 2)).unwrap();
        assert!(!s.is_empty());
        let b = s.peek().unwrap().unwrap();
        assert_eq!(b.rows, batch(0, 3));
        // Not acknowledged: the same batch again.
        assert_eq!(s.peek().unwrap().unwrap().rows, batch(0, 3));
        s.ack(&b).unwrap();
        let b = s.peek().unwrap().unwrap();
        assert_eq!(b.rows, batch(3, 2));
        s.ack(&b).unwrap();
        assert!(s.is_empty());
        assert!(s.peek().unwrap().is_none());
        // Replayed files are removed.
        let left = segments(dir.path());
        assert!(left.is_empty(), "{left:?}");
        // And appending works again afterwards.
        s.append(&batch(9, 1)).unwrap();
        assert_eq!(drain(&mut s), batch(9, 1));
    }

    #[test]
    fn survives_reopen_and_cuts_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
            s.append(&batch(0, 4)).unwrap();
            s.append(&batch(4, 4)).unwrap();
            s.sync().unwrap();
        }
        // Simulate a crash in the middle of a third append.
        let seg = segments(dir.path()).remove(0);
        let good_len = fs::metadata(&seg).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, b'[', b'{'])
            .unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
        assert_eq!(fs::metadata(&seg).unwrap().len(), good_len);
        assert_eq!(s.pending_bytes(), good_len);
        s.append(&batch(8, 1)).unwrap();
        assert_eq!(drain(&mut s), batch(0, 9));
    }

    #[test]
    fn corrupt_checksum_stops_at_the_bad_frame() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
            s.append(&batch(0, 2)).unwrap();
            s.append(&batch(2, 2)).unwrap();
        }
        let seg = segments(dir.path()).remove(0);
        let mut data = fs::read(&seg).unwrap();
        let last = data.len() - 2;
        data[last] ^= 0xff;
        fs::write(&seg, data).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
        assert_eq!(drain(&mut s), batch(0, 2));
    }

    #[test]
    fn bounded_and_refuses_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&batch(0, 10)).unwrap().len() as u64 + 8;
        let mut s = Spool::open(dir.path(), one * 2 + 10, Duration::ZERO).unwrap();
        s.append(&batch(0, 10)).unwrap();
        s.append(&batch(0, 10)).unwrap();
        assert!(matches!(s.append(&batch(0, 10)), Err(SpoolError::Full(_))));
        assert_eq!(s.pending_bytes(), one * 2);
        let b = s.peek().unwrap().unwrap();
        s.ack(&b).unwrap();
        s.append(&batch(0, 10)).unwrap();
    }

    #[test]
    fn one_owner_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Spool::open(dir.path(), 1 << 20, Duration::ZERO).unwrap();
        assert!(matches!(
            Spool::open(dir.path(), 1 << 20, Duration::ZERO),
            Err(SpoolError::Locked(_))
        ));
    }

    #[test]
    fn many_segments_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 30, Duration::ZERO).unwrap();
        // Big batches so several segments are used.
        let mut expected = Vec::new();
        for b in 0..80 {
            let rows = batch(b * 500, 500);
            expected.extend(rows.iter().cloned());
            s.append(&rows).unwrap();
        }
        let files = segments(dir.path()).len();
        assert!(files > 1, "expected several segments, got {files}");
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 30, Duration::ZERO).unwrap();
        assert_eq!(drain(&mut s), expected);
        assert_eq!(s.pending_bytes(), 0);
    }
}
