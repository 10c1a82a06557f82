//! The usage spool: the proxy's write-ahead log of usage records, on its own disk, until the
//! control plane has applied them.
//!
//! Records are JSON lines appended to numbered segment files (`{seq:020}.spool`) in one
//! directory. Each record is one `write(2)` from the request's own task, before the response's
//! last bytes go out: when it returns, the record is in the page cache and survives a crash of
//! the proxy. A background task `fsync`s the open segment every `spool_fsync_interval_ms`, so a
//! crash of the machine loses at most that much. A segment closes at
//! `spool_segment_bytes_max`; a new process always starts a new one (the last segment of a
//! crashed process may end in half a line, which is skipped).
//!
//! The shipper reads complete lines from the read position (`cursor`: segment and offset,
//! overwritten in place with a checksum after each batch the control plane acknowledged; not
//! fsynced, as one a machine crash takes back or tears only sends records again), ships them,
//! and deletes segments it has passed. The files it reads and writes stay open between batches:
//! a batch costs no file creation, rename or open. Everything between the cursor and the end is the
//! backlog, bounded by `spool_bytes_max`: a full spool refuses new records.

use crate::sync::lock;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tracing::warn;

/// Where the shipper is: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    pub segment: u64,
    pub offset: u64,
}

/// Why a record could not be spooled.
#[derive(Debug)]
pub enum SpoolError {
    /// The backlog is at `spool_bytes_max`.
    Full,
    Io(std::io::Error),
}

impl std::fmt::Display for SpoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full => f.write_str("the usage spool is full"),
            Self::Io(e) => write!(f, "usage spool: {e}"),
        }
    }
}

/// Size limits of a spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolLimits {
    pub bytes_max: u64,
    pub segment_bytes_max: u64,
}

pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    writer: Mutex<Segment>,
    /// Bytes written and not yet acknowledged by the control plane.
    backlog_bytes: AtomicU64,
    /// The cursor's segment: every segment before it is deleted.
    acknowledged_segment: AtomicU64,
    /// The cursor file, open for overwriting in place.
    cursor_file: File,
    /// The segment the shipper last read, kept open for the next batch.
    reading: Mutex<Option<(u64, File)>>,
}

/// The segment being written.
struct Segment {
    seq: u64,
    file: File,
    bytes: u64,
}

/// A batch read for shipping: complete lines and where the cursor goes once they are applied.
#[derive(Debug)]
pub struct Batch {
    pub lines: Vec<u8>,
    pub records: usize,
    pub next: Cursor,
    /// Torn bytes passed over (a crashed writer's last partial line).
    pub skipped_bytes: u64,
}

impl Batch {
    /// Spool bytes the batch covers (its lines and any torn bytes passed over).
    pub fn bytes(&self) -> u64 {
        self.lines.len() as u64 + self.skipped_bytes
    }
}

const CURSOR_FILE: &str = "cursor";
const SEGMENT_SUFFIX: &str = ".spool";

impl Spool {
    /// Opens (creating) the spool in `dir` and starts a new segment after any left by earlier
    /// runs.
    pub fn open(dir: &Path, limits: SpoolLimits) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let segments = segments(dir)?;
        let cursor_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(CURSOR_FILE))?;
        let cursor = read_cursor(&cursor_file)?;
        for seq in segments.iter().filter(|s| **s < cursor.segment) {
            let _ = std::fs::remove_file(segment_path(dir, *seq));
        }
        let seq = segments.last().map_or(1, |s| s + 1).max(cursor.segment + 1);
        let file = open_segment(dir, seq)?;
        let backlog = segments
            .iter()
            .filter(|s| **s >= cursor.segment)
            .map(|s| {
                let len = std::fs::metadata(segment_path(dir, *s)).map_or(0, |m| m.len());
                if *s == cursor.segment {
                    len.saturating_sub(cursor.offset)
                } else {
                    len
                }
            })
            .sum();
        Ok(Self {
            dir: dir.to_owned(),
            limits,
            writer: Mutex::new(Segment {
                seq,
                file,
                bytes: 0,
            }),
            backlog_bytes: AtomicU64::new(backlog),
            acknowledged_segment: AtomicU64::new(cursor.segment),
            cursor_file,
            reading: Mutex::new(None),
        })
    }

    /// Appends one record (a JSON line ending in `\n`) in one write.
    pub fn append(&self, line: &[u8]) -> Result<(), SpoolError> {
        let len = line.len() as u64;
        if self.backlog_bytes.load(Ordering::Relaxed) + len > self.limits.bytes_max {
            return Err(SpoolError::Full);
        }
        let mut w = lock(&self.writer);
        w.file.write_all(line).map_err(SpoolError::Io)?;
        w.bytes += len;
        self.backlog_bytes.fetch_add(len, Ordering::Relaxed);
        if w.bytes >= self.limits.segment_bytes_max {
            // The next segment; the full one is complete (no write reaches it again).
            let seq = w.seq + 1;
            let file = open_segment(&self.dir, seq).map_err(SpoolError::Io)?;
            *w = Segment {
                seq,
                file,
                bytes: 0,
            };
        }
        Ok(())
    }

    /// Whether a record of `bytes` would be refused now.
    pub fn is_full(&self, bytes: u64) -> bool {
        self.backlog_bytes.load(Ordering::Relaxed) + bytes > self.limits.bytes_max
    }

    /// Bytes waiting to be shipped.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog_bytes.load(Ordering::Relaxed)
    }

    /// Makes what was written so far durable (the open segment's data on disk).
    pub fn sync(&self) -> std::io::Result<()> {
        // A duplicate of the descriptor: the fsync runs without holding up writers.
        let file = lock(&self.writer).file.try_clone()?;
        file.sync_data()
    }

    /// Calls `f` with every unshipped line, in batches (at start, before anything is shipped).
    pub fn for_each_unshipped(&self, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
        let mut at = self.cursor()?;
        loop {
            let batch = self.read_batch(at, 10_000, 8 << 20)?;
            if batch.records == 0 && batch.next == at {
                return Ok(());
            }
            f(&batch.lines);
            at = batch.next;
        }
    }

    /// Where shipping resumes.
    pub fn cursor(&self) -> std::io::Result<Cursor> {
        read_cursor(&self.cursor_file)
    }

    /// Up to `records_max` complete lines (and about `bytes_max` bytes) from `from`.
    pub fn read_batch(
        &self,
        from: Cursor,
        records_max: usize,
        bytes_max: usize,
    ) -> std::io::Result<Batch> {
        let writing = lock(&self.writer).seq;
        let mut batch = Batch {
            lines: Vec::new(),
            records: 0,
            next: from,
            skipped_bytes: 0,
        };
        // Segments are numbered one after another; one the cursor passed may be gone already.
        for seq in from.segment..=writing {
            let offset = if seq == from.segment { from.offset } else { 0 };
            let room = bytes_max.saturating_sub(batch.lines.len());
            let read = self.read_lines(seq, offset, room, records_max - batch.records)?;
            batch.lines.extend_from_slice(&read.lines);
            batch.records += read.records;
            batch.next = Cursor {
                segment: seq,
                offset: read.end,
            };
            // The segment being written may still grow; a closed one read to its end is done
            // (a torn last line from a crash is dropped) and shipping goes on in the next.
            if seq >= writing || !read.to_eof {
                break;
            }
            batch.skipped_bytes += read.tail;
            batch.next = Cursor {
                segment: seq + 1,
                offset: 0,
            };
            if batch.records == records_max {
                break;
            }
        }
        Ok(batch)
    }

    /// A batch was applied: persist the cursor `to`, delete passed segments and shrink the
    /// backlog by the `bytes` the batch held.
    pub fn acknowledge(&self, to: Cursor, bytes: u64) -> std::io::Result<()> {
        write_cursor(&self.cursor_file, to)?;
        let passed = self
            .acknowledged_segment
            .swap(to.segment, Ordering::Relaxed);
        for seq in passed..to.segment {
            let _ = std::fs::remove_file(segment_path(&self.dir, seq));
        }
        let _ = self
            .backlog_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
        Ok(())
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

fn open_segment(dir: &Path, seq: u64) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, seq))?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Segment numbers present, ascending.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_suffix(SEGMENT_SUFFIX)?.parse().ok()
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// What one segment gave a batch.
struct SegmentRead {
    lines: Vec<u8>,
    records: usize,
    /// The offset after the lines.
    end: u64,
    /// No complete line is left after them in the file (bytes after `end` are a torn line).
    to_eof: bool,
    /// Bytes after `end` when `to_eof`.
    tail: u64,
}

impl Spool {
    /// Complete lines of segment `seq` from `offset`: at most `bytes_max` bytes (at least one
    /// line if there is one) and `records_max` lines. A segment already deleted reads as empty.
    fn read_lines(
        &self,
        seq: u64,
        offset: u64,
        bytes_max: usize,
        records_max: usize,
    ) -> std::io::Result<SegmentRead> {
        let mut reading = lock(&self.reading);
        if reading.as_ref().is_none_or(|(open, _)| *open != seq) {
            *reading = None;
            match File::open(segment_path(&self.dir, seq)) {
                Ok(file) => *reading = Some((seq, file)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(SegmentRead {
                        lines: Vec::new(),
                        records: 0,
                        end: offset,
                        to_eof: true,
                        tail: 0,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let Some((_, file)) = reading.as_ref() else {
            unreachable!("opened above");
        };
        let want = bytes_max.max(1) as u64 + LINE_BYTES_MAX;
        let (mut buf, hit_eof) = read_at_most(file, offset, want)?;
        let mut end = 0;
        let mut records = 0;
        while records < records_max {
            let Some(nl) = memchr::memchr(b'\n', &buf[end..]) else {
                break;
            };
            if end > 0 && end + nl + 1 > bytes_max {
                break;
            }
            end += nl + 1;
            records += 1;
        }
        let to_eof = hit_eof && memchr::memchr(b'\n', &buf[end..]).is_none();
        let tail = if to_eof { (buf.len() - end) as u64 } else { 0 };
        buf.truncate(end);
        Ok(SegmentRead {
            lines: buf,
            records,
            end: offset + end as u64,
            to_eof,
            tail,
        })
    }
}

/// Up to `want` bytes of `file` from `offset` (positioned reads: the handle has no position to
/// keep), and whether the end of the file came first.
fn read_at_most(file: &File, offset: u64, want: u64) -> std::io::Result<(Vec<u8>, bool)> {
    /// The first read's size: a batch at a low rate is a few records.
    const FIRST_READ: u64 = 16 * 1024;
    let mut buf = Vec::new();
    let mut step = FIRST_READ;
    loop {
        let have = buf.len() as u64;
        if have >= want {
            return Ok((buf, false));
        }
        let len = step.min(want - have) as usize;
        buf.resize(have as usize + len, 0);
        let n = file.read_at(&mut buf[have as usize..], offset + have)?;
        buf.truncate(have as usize + n);
        if n == 0 {
            return Ok((buf, true));
        }
        step = step.saturating_mul(2);
    }
}

/// The most a record line may be beyond a batch's byte budget (records are a few hundred
/// bytes; this bounds a read).
const LINE_BYTES_MAX: u64 = 64 * 1024;

/// The cursor file's one record: fixed width, so an overwrite replaces all of it.
fn cursor_record(c: Cursor) -> String {
    format!(
        "{:020} {:020} {:016x}\n",
        c.segment,
        c.offset,
        cursor_check(c)
    )
}

/// A checksum over the cursor (FNV-1a over its two numbers): a record a machine crash tore
/// does not pass for a cursor.
fn cursor_check(c: Cursor) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in c
        .segment
        .to_le_bytes()
        .into_iter()
        .chain(c.offset.to_le_bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn read_cursor(file: &File) -> std::io::Result<Cursor> {
    let (bytes, _) = read_at_most(file, 0, 128)?;
    if bytes.is_empty() {
        return Ok(Cursor::default());
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut parts = text.split_whitespace();
    let number = |p: Option<&str>| p.and_then(|p| p.parse::<u64>().ok());
    let (segment, offset) = (number(parts.next()), number(parts.next()));
    let check = parts.next().map(|p| u64::from_str_radix(p, 16));
    match (segment, offset, check) {
        (Some(segment), Some(offset), Some(Ok(check)))
            if check == cursor_check(Cursor { segment, offset }) =>
        {
            Ok(Cursor { segment, offset })
        }
        // Written by an earlier version (replaced whole by rename, no checksum).
        (Some(segment), Some(offset), None) => Ok(Cursor { segment, offset }),
        _ => {
            // Only a machine crash can leave it so (it is not fsynced): shipping starts again
            // from the oldest segment kept, which the ledger skips.
            warn!(message = "The spool cursor is unreadable; shipping resumes from the oldest segment kept.");
            Ok(Cursor::default())
        }
    }
}

/// Overwrites the cursor in place, in one write. Not fsynced: a cursor that a machine crash
/// takes back (or tears: the checksum fails) only sends records again, which the ledger applies
/// once.
fn write_cursor(file: &File, c: Cursor) -> std::io::Result<()> {
    file.write_all_at(cursor_record(c).as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tokn-spool-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn line(i: usize) -> Vec<u8> {
        format!(
            "{{\"request_id\":\"r{i}\",\"pad\":\"{}\"}}\n",
            "x".repeat(i % 7)
        )
        .into_bytes()
    }

    fn limits(segment: u64) -> SpoolLimits {
        SpoolLimits {
            bytes_max: 1 << 20,
            segment_bytes_max: segment,
        }
    }

    /// Ships everything from the cursor in batches of `n`, acknowledging each.
    fn drain(spool: &Spool, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let from = spool.cursor().unwrap();
            let b = spool.read_batch(from, n, 1 << 20).unwrap();
            if b.records == 0 {
                return out;
            }
            let text = String::from_utf8(b.lines.clone()).unwrap();
            out.extend(text.lines().map(str::to_owned));
            spool.acknowledge(b.next, b.bytes()).unwrap();
        }
    }

    #[test]
    fn every_record_is_shipped_once_in_order_across_segments_and_restarts() {
        let d = dir("order");
        let spool = Spool::open(&d, limits(300)).unwrap();
        for i in 0..50 {
            spool.append(&line(i)).unwrap();
        }
        let first = drain(&spool, 7);
        assert_eq!(first.len(), 50);
        // A restart opens a new segment; nothing is shipped twice, nothing lost.
        drop(spool);
        let spool = Spool::open(&d, limits(300)).unwrap();
        assert_eq!(spool.backlog_bytes(), 0);
        for i in 50..80 {
            spool.append(&line(i)).unwrap();
        }
        // Half shipped, then a crash before the acknowledgement: shipped again after restart.
        let b = spool
            .read_batch(spool.cursor().unwrap(), 10, 1 << 20)
            .unwrap();
        assert_eq!(b.records, 10);
        drop(spool);
        let spool = Spool::open(&d, limits(300)).unwrap();
        let second = drain(&spool, 4);
        let all: Vec<String> = first.into_iter().chain(second).collect();
        let expected: Vec<String> = (0..80)
            .map(|i| String::from_utf8(line(i)).unwrap().trim_end().to_owned())
            .collect();
        assert_eq!(all, expected);
        // Passed segments are deleted.
        assert!(segments(&d).unwrap().len() <= 2, "{:?}", segments(&d));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_last_line_from_a_crash_is_skipped() {
        let d = dir("torn");
        let spool = Spool::open(&d, limits(1 << 20)).unwrap();
        spool.append(&line(1)).unwrap();
        spool.append(b"{\"request_id\":\"half").unwrap();
        drop(spool);
        let spool = Spool::open(&d, limits(1 << 20)).unwrap();
        spool.append(&line(2)).unwrap();
        let shipped = drain(&spool, 100);
        assert_eq!(shipped.len(), 2, "{shipped:?}");
        assert!(shipped.iter().all(|l| !l.contains("half")));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_cursor_a_crash_left_unreadable_resends_what_is_kept_and_loses_nothing() {
        let d = dir("cursor");
        let spool = Spool::open(&d, limits(200)).unwrap();
        for i in 0..20 {
            spool.append(&line(i)).unwrap();
        }
        let shipped = drain(&spool, 3);
        for i in 20..25 {
            spool.append(&line(i)).unwrap();
        }
        drop(spool);
        // A machine crash tore the cursor's last overwrite: one of its digits is another.
        let mut torn = std::fs::read(d.join(CURSOR_FILE)).unwrap();
        torn[19] = if torn[19] == b'9' { b'8' } else { torn[19] + 1 };
        std::fs::write(d.join(CURSOR_FILE), &torn).unwrap();
        let spool = Spool::open(&d, limits(200)).unwrap();
        let again = drain(&spool, 3);
        // Everything not yet shipped is there; what is sent again is only what was shipped.
        let unshipped: Vec<String> = (20..25)
            .map(|i| String::from_utf8(line(i)).unwrap().trim_end().to_owned())
            .collect();
        assert!(again.ends_with(&unshipped), "{again:?}");
        let resent = &again[..again.len() - unshipped.len()];
        assert!(resent.iter().all(|l| shipped.contains(l)), "{resent:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn batches_overwrite_one_cursor_file_and_an_earlier_versions_cursor_is_read() {
        use std::os::unix::fs::MetadataExt;
        let d = dir("inplace");
        let spool = Spool::open(&d, limits(200)).unwrap();
        let inode = std::fs::metadata(d.join(CURSOR_FILE)).unwrap().ino();
        for i in 0..30 {
            spool.append(&line(i)).unwrap();
        }
        assert_eq!(drain(&spool, 2).len(), 30);
        // No file was created per batch: the cursor is the same file, overwritten.
        assert_eq!(std::fs::metadata(d.join(CURSOR_FILE)).unwrap().ino(), inode);
        let at = spool.cursor().unwrap();
        assert!(at.segment > 1, "{at:?}");
        drop(spool);
        // An earlier version wrote "segment offset" and replaced the file by rename.
        std::fs::write(
            d.join(CURSOR_FILE),
            format!("{} {}\n", at.segment, at.offset),
        )
        .unwrap();
        let spool = Spool::open(&d, limits(200)).unwrap();
        assert_eq!(spool.cursor().unwrap(), at);
        assert!(drain(&spool, 5).is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_full_spool_refuses_and_frees_room_as_it_drains() {
        let d = dir("full");
        let spool = Spool::open(
            &d,
            SpoolLimits {
                bytes_max: 200,
                segment_bytes_max: 100,
            },
        )
        .unwrap();
        let mut written = 0;
        while spool.append(&line(3)).is_ok() {
            written += 1;
        }
        assert!(written > 0 && spool.is_full(line(3).len() as u64));
        assert!(matches!(spool.append(&line(3)), Err(SpoolError::Full)));
        assert_eq!(drain(&spool, 100).len(), written);
        assert_eq!(spool.backlog_bytes(), 0);
        spool.append(&line(3)).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
