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
//!
//! Beside the open segment, the process keeps an intent journal (`{seq:020}-{pid}.intents`): a
//! billed request's record as it would read were the request lost, written before the request
//! goes upstream, so a proxy killed mid-request still bills it (`settle_lost`, at the next
//! start). A journal goes with its segment: it starts when the segment does, carries over the
//! intents still in flight and is deleted when the next one starts. So every completed request
//! of a journal has its record in that segment or a later one — never in one already shipped
//! and deleted — and the next start tells lost requests from completed ones by reading the
//! unshipped records alone. A live process holds a lock on its journal: journals of processes
//! still running (a graceful upgrade's old process) are left to them.

use crate::sync::lock;
use std::collections::HashMap;
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
    writer: Mutex<Writer>,
    /// Bytes written and not yet acknowledged by the control plane.
    backlog_bytes: AtomicU64,
    /// The cursor's segment: every segment before it is deleted.
    acknowledged_segment: AtomicU64,
    /// The cursor file, open for overwriting in place.
    cursor_file: File,
    /// The segment the shipper last read, kept open for the next batch.
    reading: Mutex<Option<(u64, File)>>,
}

/// The segment being written, and the intents of requests in flight.
struct Writer {
    seq: u64,
    file: File,
    bytes: u64,
    /// The intent journal that goes with segment `seq` (locked while this process lives).
    journal: File,
    /// Intents whose records are not written yet, by request id: what a new journal carries.
    in_flight: HashMap<String, Vec<u8>>,
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
const JOURNAL_SUFFIX: &str = ".intents";

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
        let in_flight = HashMap::new();
        let journal = open_journal(dir, seq, &in_flight)?;
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
            writer: Mutex::new(Writer {
                seq,
                file,
                bytes: 0,
                journal,
                in_flight,
            }),
            backlog_bytes: AtomicU64::new(backlog),
            acknowledged_segment: AtomicU64::new(cursor.segment),
            cursor_file,
            reading: Mutex::new(None),
        })
    }

    /// Appends one record (a JSON line ending in `\n`, or several) in one write.
    pub fn append(&self, line: &[u8]) -> Result<(), SpoolError> {
        self.append_to(&mut lock(&self.writer), line)
    }

    /// Appends request `request_id`'s record (tests; requests go through `record_all`).
    #[cfg(test)]
    pub fn record(&self, request_id: &str, line: &[u8]) -> Result<(), SpoolError> {
        self.record_all(&[(request_id, line)])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Appends the records of several requests (`(request id, line)`) in one write: their
    /// intents are no longer in flight. Each request's outcome, in order; a record the backlog
    /// has no room for is refused alone.
    pub fn record_all(&self, records: &[(&str, &[u8])]) -> Vec<Result<(), SpoolError>> {
        let mut w = lock(&self.writer);
        let mut room = self
            .limits
            .bytes_max
            .saturating_sub(self.backlog_bytes.load(Ordering::Relaxed));
        let mut lines = Vec::with_capacity(records.iter().map(|(_, l)| l.len()).sum());
        let mut out: Vec<Result<(), SpoolError>> = Vec::with_capacity(records.len());
        for (request_id, line) in records {
            w.in_flight.remove(*request_id);
            let len = line.len() as u64;
            if len > room {
                out.push(Err(SpoolError::Full));
                continue;
            }
            room -= len;
            lines.extend_from_slice(line);
            out.push(Ok(()));
        }
        if lines.is_empty() {
            return out;
        }
        if let Err(SpoolError::Io(e)) = self.append_to(&mut w, &lines) {
            for o in out.iter_mut().filter(|o| o.is_ok()) {
                *o = Err(SpoolError::Io(std::io::Error::new(e.kind(), e.to_string())));
            }
        }
        out
    }

    /// Journals request `request_id`'s intent (tests; requests go through `intend_all`).
    #[cfg(test)]
    pub fn intend(&self, request_id: &str, line: Vec<u8>) -> std::io::Result<()> {
        self.intend_all(vec![(request_id.to_owned(), line)])
    }

    /// Journals the intents of several requests (`(request id, line)`: each its record were it
    /// lost now) in one write, before they go upstream; each one's record (`record_all`) ends
    /// it. A later intent of the same request (another pool tried) replaces it.
    pub fn intend_all(&self, intents: Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        let mut w = lock(&self.writer);
        match intents.as_slice() {
            [(_, line)] => (&w.journal).write_all(line)?,
            _ => {
                let lines: Vec<&[u8]> = intents.iter().map(|(_, l)| l.as_slice()).collect();
                (&w.journal).write_all(&lines.concat())?
            }
        }
        w.in_flight.extend(intents);
        Ok(())
    }

    fn append_to(&self, w: &mut Writer, line: &[u8]) -> Result<(), SpoolError> {
        let len = line.len() as u64;
        if self.backlog_bytes.load(Ordering::Relaxed) + len > self.limits.bytes_max {
            return Err(SpoolError::Full);
        }
        w.file.write_all(line).map_err(SpoolError::Io)?;
        w.bytes += len;
        self.backlog_bytes.fetch_add(len, Ordering::Relaxed);
        if w.bytes >= self.limits.segment_bytes_max {
            // The next segment and its journal; the full one is complete (no write reaches it
            // again). The journal first: the segment's directory sync covers both names.
            let seq = w.seq + 1;
            let journal = open_journal(&self.dir, seq, &w.in_flight).map_err(SpoolError::Io)?;
            w.file = open_segment(&self.dir, seq).map_err(SpoolError::Io)?;
            let _ = std::fs::remove_file(journal_path(&self.dir, w.seq));
            w.journal = journal;
            w.seq = seq;
            w.bytes = 0;
        }
        Ok(())
    }

    /// Bills what processes that died had in flight: each intent in their journals whose record
    /// is not in the journal's segment or a later one is appended as its record. Call it at
    /// start, before shipping. Returns the lines appended.
    pub fn settle_lost(&self) -> std::io::Result<Vec<u8>> {
        let journals = orphaned_journals(&self.dir)?;
        let mut lost: HashMap<String, Vec<u8>> = HashMap::new();
        for (_, path) in &journals {
            let text = std::fs::read(path)?;
            // Complete lines only: a torn last one was never an intent acted on.
            for line in text.split_inclusive(|b| *b == b'\n') {
                if let (Some(id), Some(b'\n')) = (request_id(line), line.last()) {
                    lost.insert(id.into_owned(), line.to_vec());
                }
            }
        }
        // The oldest journal's segment is kept: it was being written when its process died.
        if let (false, Some(&(segment, _))) = (lost.is_empty(), journals.first()) {
            self.for_each_line(Cursor { segment, offset: 0 }, |lines| {
                for line in lines.split(|b| *b == b'\n') {
                    if let Some(id) = request_id(line) {
                        lost.remove(id.as_ref());
                    }
                }
            })?;
        }
        let mut lost: Vec<(String, Vec<u8>)> = lost.into_iter().collect();
        lost.sort_unstable();
        let lines: Vec<u8> = lost.into_iter().flat_map(|(_, line)| line).collect();
        if !lines.is_empty() {
            self.append(&lines).map_err(|e| match e {
                SpoolError::Io(e) => e,
                full @ SpoolError::Full => std::io::Error::other(full.to_string()),
            })?;
            self.sync()?;
        }
        for (_, path) in journals {
            std::fs::remove_file(path)?;
        }
        Ok(lines)
    }

    /// Whether a record of `bytes` would be refused now.
    pub fn is_full(&self, bytes: u64) -> bool {
        self.backlog_bytes.load(Ordering::Relaxed) + bytes > self.limits.bytes_max
    }

    /// Bytes waiting to be shipped.
    pub fn backlog_bytes(&self) -> u64 {
        self.backlog_bytes.load(Ordering::Relaxed)
    }

    /// Makes what was written so far durable (the open segment's and journal's data on disk).
    pub fn sync(&self) -> std::io::Result<()> {
        // Duplicates of the descriptors: the fsyncs run without holding up writers.
        let (file, journal) = {
            let w = lock(&self.writer);
            (w.file.try_clone()?, w.journal.try_clone()?)
        };
        file.sync_data()?;
        journal.sync_data()
    }

    /// Calls `f` with every unshipped line, in batches (at start, before anything is shipped).
    pub fn for_each_unshipped(&self, f: impl FnMut(&[u8])) -> std::io::Result<()> {
        self.for_each_line(self.cursor()?, f)
    }

    /// Calls `f` with every line from `at` on, in batches.
    fn for_each_line(&self, mut at: Cursor, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
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
            // The segment being written may still grow — ours, or one another process still
            // writes (a graceful upgrade's old process, which holds its journal's lock) — and
            // is not passed (passing deletes it); a closed one read to its end is done (a torn
            // last line from a crash is dropped) and shipping goes on in the next.
            if seq >= writing || !read.to_eof || written_elsewhere(&self.dir, seq) {
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

fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}-{}{JOURNAL_SUFFIX}", std::process::id()))
}

/// Starts segment `seq`'s intent journal with the intents `in_flight`, locked for as long as
/// this process holds it. It is made and locked under a name no other process reads, then
/// renamed: no process starting meanwhile can take it for a dead one's.
fn open_journal(
    dir: &Path,
    seq: u64,
    in_flight: &HashMap<String, Vec<u8>>,
) -> std::io::Result<File> {
    let path = journal_path(dir, seq);
    let making = path.with_extension("making");
    let file = OpenOptions::new().create(true).append(true).open(&making)?;
    file.try_lock().map_err(std::io::Error::other)?;
    let carried: Vec<u8> = in_flight.values().flatten().copied().collect();
    (&file).write_all(&carried)?;
    std::fs::rename(&making, &path)?;
    Ok(file)
}

/// Whether another living process still writes segment `seq` (it holds the lock of the
/// segment's journal). Asked only when shipping reaches a segment's end.
fn written_elsewhere(dir: &Path, seq: u64) -> bool {
    let prefix = format!("{seq:020}-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with(&prefix)
            && name.ends_with(JOURNAL_SUFFIX)
            && File::open(e.path()).is_ok_and(|f| f.try_lock().is_err())
    })
}

/// Journals no living process holds (their lock went with their process), by segment number,
/// ascending.
fn orphaned_journals(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        // A journal a process died making (before its rename) holds nothing the journal it
        // was replacing does not: removed once no process holds it.
        if path.extension().is_some_and(|e| e == "making") {
            if File::open(&path).is_ok_and(|f| f.try_lock().is_ok()) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Some(seq) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_suffix(JOURNAL_SUFFIX))
            .and_then(|n| n.split('-').next()?.parse().ok())
        else {
            continue;
        };
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if file.try_lock().is_ok() {
            out.push((seq, path));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A record's request id (every record line is a JSON object that names one).
fn request_id(line: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        request_id: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Named<'_>>(line.trim_ascii_end())
        .ok()
        .map(|n| n.request_id)
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

    fn settled_ids(lines: &[u8]) -> Vec<String> {
        let mut ids: Vec<String> = lines
            .split(|b| *b == b'\n')
            .filter_map(|l| request_id(l).map(|id| id.into_owned()))
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn requests_a_killed_process_had_in_flight_are_settled_once_and_completed_ones_never() {
        let d = dir("intents");
        let spool = Spool::open(&d, limits(400)).unwrap();
        // Completed and shipped, completed and not shipped, in flight across segment changes,
        // and one tried on a second pool (the later intent stands).
        spool.intend("shipped", line(1)).unwrap();
        spool.record("shipped", &line(1)).unwrap();
        assert_eq!(drain(&spool, 10).len(), 1);
        spool
            .intend(
                "inflight",
                b"{\"request_id\":\"inflight\",\"pool\":1}\n".to_vec(),
            )
            .unwrap();
        spool
            .intend(
                "inflight",
                b"{\"request_id\":\"inflight\",\"pool\":2}\n".to_vec(),
            )
            .unwrap();
        spool.intend("unshipped", line(2)).unwrap();
        for i in 10..40 {
            spool.append(&line(i)).unwrap();
        }
        spool.record("unshipped", &line(2)).unwrap();
        assert!(lock(&spool.writer).seq > 2, "segments changed");
        // SIGKILL: the journal's lock goes with the process (here: its descriptor). A journal
        // it was making is left half made.
        drop(spool);
        let making = d.join("00000000000000000099-1.making");
        std::fs::write(&making, line(7)).unwrap();
        let spool = Spool::open(&d, limits(400)).unwrap();
        let settled = spool.settle_lost().unwrap();
        assert!(!making.exists());
        assert_eq!(
            String::from_utf8(settled).unwrap(),
            "{\"request_id\":\"inflight\",\"pool\":2}\n"
        );
        // It ships as a record, after the ones before it; a second start settles nothing more.
        let shipped = drain(&spool, 100);
        assert_eq!(
            shipped.last().unwrap(),
            "{\"request_id\":\"inflight\",\"pool\":2}"
        );
        // Completed and acknowledged in the segment still being written: not lost either.
        spool.intend("acked", line(3)).unwrap();
        spool.record("acked", &line(3)).unwrap();
        assert_eq!(drain(&spool, 100).len(), 1);
        drop(spool);
        let spool = Spool::open(&d, limits(400)).unwrap();
        assert!(spool.settle_lost().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_segment_another_living_process_writes_is_not_passed_until_it_ends() {
        let d = dir("upgrade");
        let old = Spool::open(&d, limits(1 << 20)).unwrap();
        old.append(&line(1)).unwrap();
        // A graceful upgrade: the new process ships while the old one still serves.
        let new = Spool::open(&d, limits(1 << 20)).unwrap();
        new.append(&line(2)).unwrap();
        let first = drain(&new, 10);
        assert_eq!(first.len(), 1, "{first:?}");
        // What the old process writes after that is not lost: its segment was kept.
        old.append(&line(3)).unwrap();
        let second = drain(&new, 10);
        assert_eq!(second.len(), 1, "{second:?}");
        drop(old);
        // Once it is gone, shipping goes on past its segment.
        let rest = drain(&new, 10);
        let all: Vec<String> = first.into_iter().chain(second).chain(rest).collect();
        let expected: Vec<String> = [1, 3, 2]
            .iter()
            .map(|i| String::from_utf8(line(*i)).unwrap().trim_end().to_owned())
            .collect();
        assert_eq!(all, expected);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_live_process_journal_is_left_to_it() {
        let d = dir("intents-live");
        let old = Spool::open(&d, limits(1 << 20)).unwrap();
        old.intend("r1", line(1)).unwrap();
        // A graceful upgrade: a new process opens the same spool while the old one serves.
        let new = Spool::open(&d, limits(1 << 20)).unwrap();
        assert!(new.settle_lost().unwrap().is_empty());
        // The old process ends its request; a journal it leaves is settled only when it is gone.
        old.intend("r2", line(2)).unwrap();
        old.record("r1", &line(1)).unwrap();
        drop(old);
        assert_eq!(settled_ids(&new.settle_lost().unwrap()), ["r2"]);
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
