//! TensorBoard event files for scalars, without TensorFlow.
//!
//! An event file is a sequence of TFRecords, each holding one serialized
//! `tensorflow.Event` protobuf. The first record carries only
//! `file_version = "brain.Event:2"`; every later one a `Summary` with one
//! `simple_value` (which TensorBoard's scalar dashboard reads as a scalar).
//!
//! The protobuf encoder is hand-written: an event needs only four wire types
//! (varint, fixed64, fixed32, length-delimited), so a code generator or
//! `prost` would cost more build time than the fifty lines it replaces.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC-32C (Castagnoli), as TFRecord uses.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Per-process writer counter: the last field of the file name, as
/// TensorFlow's global uid, so two writers created within one second in one
/// process get distinct files.
static WRITER_UID: AtomicU64 = AtomicU64::new(0);

/// Writes `events.out.tfevents.<secs>.<host>.<pid>.<n>` in a log directory.
///
/// Records are buffered; [`EventWriter::flush`] hands them to the OS, after
/// which a running `tensorboard --logdir` picks them up. Dropping the writer
/// flushes too (ignoring errors): call `flush` to see them.
pub struct EventWriter {
    out: BufWriter<fs_err::File>,
    path: PathBuf,
}

impl EventWriter {
    /// Create `dir` if needed and a new event file in it, starting with the
    /// file-version record.
    pub fn create(dir: &Path) -> io::Result<Self> {
        fs_err::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let uid = WRITER_UID.fetch_add(1, Ordering::Relaxed);
        let name = format!("events.out.tfevents.{:010}.{}.{}.{uid}", now.as_secs(), hostname(), std::process::id());
        let path = dir.join(name);
        let file = fs_err::OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut w = EventWriter { out: BufWriter::new(file), path };
        let first = Event { wall_time: now.as_secs_f64(), step: 0, what: What::FileVersion("brain.Event:2") };
        w.write_record(&first.encode())?;
        w.flush()?;
        Ok(w)
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one scalar (`tag` as TensorBoard groups it: `train/loss`).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> io::Result<()> {
        let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.scalar_at(wall_time, tag, step, value)
    }

    /// [`EventWriter::scalar`] with an explicit wall time (seconds since the epoch).
    pub fn scalar_at(&mut self, wall_time: f64, tag: &str, step: u64, value: f32) -> io::Result<()> {
        let ev = Event { wall_time, step: step as i64, what: What::Scalar { tag, value } };
        self.write_record(&ev.encode())
    }

    /// Hand buffered records to the OS, where readers see them. No fsync:
    /// TensorFlow's writer does not sync either, and a lost tail of scalars
    /// after a machine crash is harmless (the trainer resumes and rewrites).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(&frame_record(data))
    }
}

/// This machine's host name, as Python's `socket.gethostname()` gives it;
/// `localhost` when it cannot be read. Characters that do not belong in a
/// file name become `_`.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let mut name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        fs_err::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
    };
    if name.is_empty() {
        name = "localhost".to_owned();
    }
    name.chars().map(|c| if c == '/' || c.is_control() { '_' } else { c }).collect()
}

/// CRC-32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    CRC32C.checksum(data)
}

/// TFRecord's masked CRC: rotate right by 15, add a constant, so that a CRC
/// stored inside data that is itself checksummed does not degenerate.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 LE length, masked CRC of those 8 bytes, data, masked CRC
/// of the data.
pub(crate) fn frame_record(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    let len = (data.len() as u64).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The subset of `tensorflow.Event` we write.
pub(crate) struct Event<'a> {
    pub wall_time: f64,
    pub step: i64,
    pub what: What<'a>,
}

pub(crate) enum What<'a> {
    /// `file_version` (field 3).
    FileVersion(&'a str),
    /// `summary` (field 5) holding one `Summary.Value { tag, simple_value }`.
    Scalar { tag: &'a str, value: f32 },
}

impl Event<'_> {
    /// Protobuf bytes, fields in number order. proto3 omits zero scalars, so
    /// `step: 0` is left out, as TensorFlow and Python protobuf do.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        pb::fixed64(&mut out, 1, self.wall_time.to_bits());
        if self.step != 0 {
            pb::varint_field(&mut out, 2, self.step as u64);
        }
        match self.what {
            What::FileVersion(v) => pb::bytes(&mut out, 3, v.as_bytes()),
            What::Scalar { tag, value } => {
                let mut val = Vec::with_capacity(tag.len() + 8);
                pb::bytes(&mut val, 1, tag.as_bytes());
                pb::fixed32(&mut val, 2, value.to_bits());
                let mut summary = Vec::with_capacity(val.len() + 4);
                pb::bytes(&mut summary, 1, &val);
                pb::bytes(&mut out, 5, &summary);
            }
        }
        out
    }
}

/// The four protobuf wire encodings an event needs.
mod pb {
    const VARINT: u32 = 0;
    const FIXED64: u32 = 1;
    const LEN: u32 = 2;
    const FIXED32: u32 = 5;

    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
        varint(out, u64::from((field << 3) | wire));
    }

    pub fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, VARINT);
        varint(out, v);
    }

    pub fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, FIXED64);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
        key(out, field, FIXED32);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        key(out, field, LEN);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader written from the format description, independent of the
    /// writer: split records checking both CRCs, then decode events.
    fn read_records(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert!(b.len() >= 12, "truncated header");
            let len_bytes: [u8; 8] = b[..8].try_into().unwrap();
            let len_crc = u32::from_le_bytes(b[8..12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(&len_bytes), "length crc");
            let len = u64::from_le_bytes(len_bytes) as usize;
            let data = &b[12..12 + len];
            let data_crc = u32::from_le_bytes(b[12 + len..16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked_crc32c(data), "data crc");
            out.push(data.to_vec());
            b = &b[16 + len..];
        }
        out
    }

    #[derive(Debug, PartialEq, Default)]
    struct Decoded {
        wall_time: f64,
        step: i64,
        file_version: Option<String>,
        scalars: Vec<(String, f32)>,
    }

    fn get_varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return v;
            }
        }
        panic!("varint too long")
    }

    /// (field, wire type, payload) triples of one message.
    fn fields(mut b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let key = get_varint(&mut b);
            let (field, wire) = (key >> 3, key & 7);
            let n = match wire {
                0 => {
                    let v = get_varint(&mut b);
                    out.push((field, wire, v.to_le_bytes().to_vec()));
                    continue;
                }
                1 => 8,
                2 => get_varint(&mut b) as usize,
                5 => 4,
                w => panic!("wire type {w}"),
            };
            out.push((field, wire, b[..n].to_vec()));
            b = &b[n..];
        }
        out
    }

    fn decode_event(b: &[u8]) -> Decoded {
        let mut ev = Decoded::default();
        for (field, wire, p) in fields(b) {
            match (field, wire) {
                (1, 1) => ev.wall_time = f64::from_le_bytes(p[..8].try_into().unwrap()),
                (2, 0) => ev.step = i64::from_le_bytes(p[..8].try_into().unwrap()),
                (3, 2) => ev.file_version = Some(String::from_utf8(p).unwrap()),
                (5, 2) => {
                    for (f, w, val) in fields(&p) {
                        assert_eq!((f, w), (1, 2), "Summary.value");
                        let (mut tag, mut v) = (String::new(), f32::NAN);
                        for (f, w, x) in fields(&val) {
                            match (f, w) {
                                (1, 2) => tag = String::from_utf8(x).unwrap(),
                                (2, 5) => v = f32::from_le_bytes(x[..4].try_into().unwrap()),
                                other => panic!("unexpected Value field {other:?}"),
                            }
                        }
                        ev.scalars.push((tag, v));
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        ev
    }

    #[test]
    fn crc32c_known_vectors() {
        // The CRC catalogue's check value and RFC 3720 (iSCSI) B.4 vectors.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
        // Mask: ((crc >> 15) | (crc << 17)) + 0xa282ead8, by hand for 0xE3069283:
        // rotr15 = 0x2507_C60D; + 0xA282_EAD8 = 0xC78A_B0E5.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn record_framing_bytes() {
        let rec = frame_record(b"abc");
        assert_eq!(rec.len(), 3 + 16);
        assert_eq!(&rec[..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&rec[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&rec[12..15], b"abc");
        // CRC-32C("abc") = 0x364B3FB7 -> rotr15 0x7F6E_6C96 -> + mask const.
        assert_eq!(crc32c(b"abc"), 0x364B_3FB7);
        assert_eq!(&rec[15..], &0x7F6E_6C96u32.wrapping_add(0xa282_ead8).to_le_bytes());
    }

    #[test]
    fn event_protobuf_bytes() {
        let ev = Event { wall_time: 1.5, step: 300, what: What::Scalar { tag: "a/b", value: 2.0 } };
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f,          // wall_time 1.5 (fixed64)
            0x10, 0xac, 0x02,                             // step 300 (varint)
            0x2a, 0x0c,                                   // summary, 12 bytes
              0x0a, 0x0a,                                 //   value, 10 bytes
                0x0a, 0x03, b'a', b'/', b'b',             //     tag "a/b"
                0x15, 0, 0, 0, 0x40,                      //     simple_value 2.0f (fixed32)
        ];
        assert_eq!(ev.encode(), want);

        let first = Event { wall_time: 0.0, step: 0, what: What::FileVersion("brain.Event:2") };
        let mut want = vec![0x09, 0, 0, 0, 0, 0, 0, 0, 0, 0x1a, 13];
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(first.encode(), want);
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("train/loss", 1, 2.5).unwrap();
        w.scalar("train/lr", 1, 1e-4).unwrap();
        w.scalar_at(1234.25, "train/loss", 1 << 40, -0.0).unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_owned();
        let parts: Vec<&str> = name.split('.').collect();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert_eq!(parts[3].len(), 10, "{name}");
        assert_eq!(parts[parts.len() - 2], std::process::id().to_string(), "{name}");

        let bytes = fs_err::read(w.path()).unwrap();
        let evs: Vec<Decoded> = read_records(&bytes).iter().map(|r| decode_event(r)).collect();
        assert_eq!(evs.len(), 4);
        assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
        assert!(evs[0].wall_time > 1.6e9 && evs[0].scalars.is_empty());
        assert_eq!((evs[1].step, &evs[1].scalars[..]), (1, &[("train/loss".to_owned(), 2.5)][..]));
        assert_eq!((evs[2].step, &evs[2].scalars[..]), (1, &[("train/lr".to_owned(), 1e-4)][..]));
        assert_eq!(
            evs[3],
            Decoded {
                wall_time: 1234.25,
                step: 1 << 40,
                file_version: None,
                scalars: vec![("train/loss".into(), -0.0)]
            }
        );

        // A second writer in the same second gets its own file.
        let w2 = EventWriter::create(dir.path()).unwrap();
        assert_ne!(w2.path(), w.path());
    }
}
