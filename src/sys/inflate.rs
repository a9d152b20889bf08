//! A small safe wrapper over zlib-rs's raw `inflate` API, which exposes what
//! random access into gzip needs and `flate2` hides: stopping at deflate
//! block boundaries (`Z_BLOCK`), the bit position there (`data_type`), and
//! resuming mid-stream with `inflatePrime` + `inflateSetDictionary`.

use libz_rs_sys as z;
use std::ffi::c_int;

/// How the stream is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// gzip header and trailer around the deflate data.
    Gzip,
    /// Bare deflate data (used when resuming at a checkpoint).
    Raw,
}

impl Framing {
    fn window_bits(self) -> c_int {
        match self {
            Framing::Gzip => 15 + 16,
            Framing::Raw => -15,
        }
    }
}

/// zlib reported corrupt or unusable input.
#[derive(Debug, thiserror::Error)]
#[error("corrupt deflate data (zlib code {code}{})", msg.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct InflateError {
    /// zlib's return code.
    pub code: i32,
    /// zlib's message, when it gave one.
    pub msg: Option<String>,
}

/// The outcome of one [`Inflater::inflate`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output bytes produced.
    pub produced: usize,
    /// The end of the member (gzip) or deflate stream (raw) was reached.
    pub stream_end: bool,
    /// Stopped exactly at a deflate block boundary that is not the end of the stream.
    pub at_block_boundary: bool,
    /// Unused bits in the last consumed input byte (meaningful at a block boundary).
    pub unused_bits: u8,
}

/// A zlib inflate stream.
pub struct Inflater {
    /// Boxed: zlib keeps a pointer back to the stream, so it must not move.
    strm: Box<z::z_stream>,
}

// SAFETY: the z_stream owns its state exclusively; no other thread holds
// pointers into it, and every method takes `&mut self`.
unsafe impl Send for Inflater {}

impl Inflater {
    /// A new inflater for `framing`.
    pub fn new(framing: Framing) -> Result<Self, InflateError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised (allocator fields set)
        // stream at a stable heap address; the version string is zlib's own.
        let code = unsafe {
            z::inflateInit2_(
                &mut *strm,
                framing.window_bits(),
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        let mut me = Self { strm };
        me.check(code)?;
        Ok(me)
    }

    /// Starts over with `framing`, keeping the allocated state.
    pub fn reset(&mut self, framing: Framing) -> Result<(), InflateError> {
        // SAFETY: the stream was initialised by `new`.
        let code = unsafe { z::inflateReset2(&mut *self.strm, framing.window_bits()) };
        self.check(code)
    }

    /// Feeds the `bits` high bits of `byte` that belong to the next block
    /// (resuming at a checkpoint whose position is mid-byte).
    pub fn prime(&mut self, bits: u8, byte: u8) -> Result<(), InflateError> {
        let value = c_int::from(byte) >> (8 - c_int::from(bits));
        // SAFETY: the stream was initialised by `new`; bits is 0..=7.
        let code = unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), value) };
        self.check(code)
    }

    /// Sets the 32 KiB window the resumed stream may refer back into.
    pub fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), InflateError> {
        // SAFETY: `dict` is a valid slice for the duration of the call; zlib copies it.
        let code = unsafe {
            z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as z::uInt)
        };
        self.check(code)
    }

    /// Inflates from `input` into `output`, stopping at the next block
    /// boundary, the end of the stream, or when either buffer is exhausted.
    pub fn inflate(&mut self, input: &[u8], output: &mut [u8]) -> Result<Step, InflateError> {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as z::uInt;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as z::uInt;
        // SAFETY: next_in/next_out point into live slices of the given lengths,
        // which outlive the call; zlib reads/writes only within them.
        let code = unsafe { z::inflate(&mut *self.strm, z::Z_BLOCK) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        let stream_end = code == z::Z_STREAM_END;
        if !stream_end && code != z::Z_BUF_ERROR {
            self.check(code)?;
        }
        let data_type = self.strm.data_type;
        Ok(Step {
            consumed,
            produced,
            stream_end,
            at_block_boundary: !stream_end && data_type & 128 != 0 && data_type & 64 == 0,
            unused_bits: (data_type & 7) as u8,
        })
    }

    fn check(&mut self, code: c_int) -> Result<(), InflateError> {
        if code == z::Z_OK {
            return Ok(());
        }
        let msg = (!self.strm.msg.is_null()).then(|| {
            // SAFETY: zlib sets `msg` to a static NUL-terminated string or null.
            unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }.to_string_lossy().into_owned()
        });
        Err(InflateError { code, msg })
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by `new` and is ended exactly once.
        unsafe { z::inflateEnd(&mut *self.strm) };
    }
}
