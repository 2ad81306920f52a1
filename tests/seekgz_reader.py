# Draft of the Klipper extra's reader for a seekable gzip memfd (issue 16).
#
# NOT SHIPPED YET: this class is pasted into
# klippy-extras/encrypted_file_bridge.py when the helper writes seekable gzip
# payloads into its memfds (phase 2 of issue 16). Until then only the tests
# and bench/inflate_stall.py use it. Stdlib only, Klipper style.
#
# The memfd holds the decrypted payload as is: gzip block members, index
# members, footer (docs/format.md, "Seekable gzip payload"). The reader
# presents virtual_sdcard a seekable file of the G-code's size: positions
# are byte offsets of the G-code, each read inflates at most one block.
import array, io, itertools, os, struct, zlib

GZIP_MAGIC = b"\x1f\x8b"
_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
BLOCK_MAGIC = _HEAD + b"\x08\x00Eb\x04\x00"
BLOCK_HEADER = len(BLOCK_MAGIC) + 4
INDEX_HEAD = _HEAD          # + XLEN, 'Ei', LEN, entries
FOOTER_HEAD = _HEAD + b"\x24\x00Ef\x20\x00"
EMPTY_TAIL = b"\x03\x00" + b"\x00" * 8
FOOTER_SIZE = len(FOOTER_HEAD) + 32 + len(EMPTY_TAIL)
INDEX_MAX = (65535 - 4) // 4
MIN_BLOCK, MAX_BLOCK = 4 << 10, 1 << 20
MIN_MEMBER = BLOCK_HEADER + 2 + 8


class SeekgzError(IOError):
    pass


def _bridge():
    # The shipped extra, for the classes this draft shares with it.
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir,
                        "klippy-extras", "encrypted_file_bridge.py")
    spec = importlib.util.spec_from_file_location("encrypted_file_bridge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_BRIDGE = _bridge()
ShutdownRead = _BRIDGE.ShutdownRead
# The shutdown guard above the buffer, so buffered bytes are refused too.
GuardedBuffer = _BRIDGE._GuardedBuffer


def _pread(fd, n, off):
    data = os.pread(fd, n, off)
    if len(data) != n:
        raise SeekgzError("short read of the encrypted file's memory")
    return data


class SeekgzIndex:
    # The footer and index of a seekable gzip payload, checked for
    # consistency. The helper validated every block before the memfd left
    # it; this only refuses what it cannot read, never trusts a size blindly.
    def __init__(self, fd, size):
        if size < FOOTER_SIZE:
            raise SeekgzError("compressed payload too short for its footer")
        foot = _pread(fd, FOOTER_SIZE, size - FOOTER_SIZE)
        if (foot[:len(FOOTER_HEAD)] != FOOTER_HEAD
                or foot[-len(EMPTY_TAIL):] != EMPTY_TAIL):
            raise SeekgzError("compressed payload has no seekable gzip footer")
        (version, bs, clear, ioff, nblocks, ilen) = struct.unpack_from(
            "<IIQQII", foot, len(FOOTER_HEAD))
        if version != 1:
            raise SeekgzError("seekable gzip version %d is not supported"
                              % (version,))
        if not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise SeekgzError("bad block size %d" % (bs,))
        if nblocks != (clear + bs - 1) // bs or nblocks > size // MIN_MEMBER:
            raise SeekgzError("block count %d does not match the size"
                              % (nblocks,))
        if ioff + ilen + FOOTER_SIZE != size:
            raise SeekgzError("index does not end at the footer")
        raw = _pread(fd, ilen, ioff)
        sizes = []
        pos = 0
        left = nblocks
        while left:
            k = min(left, INDEX_MAX)
            head = raw[pos:pos + 16]
            if (head != INDEX_HEAD + struct.pack("<H2sH", 4 + 4 * k, b"Ei",
                                                 4 * k)
                    or raw[pos + 16 + 4 * k:pos + 26 + 4 * k] != EMPTY_TAIL):
                raise SeekgzError("malformed index member")
            sizes.append(struct.unpack_from("<%dI" % (k,), raw, pos + 16))
            pos += 26 + 4 * k
            left -= k
        if pos != ilen:
            raise SeekgzError("index length does not match its entries")
        offsets = array.array('Q', [0])
        offsets.extend(itertools.accumulate(itertools.chain(*sizes)))
        if offsets[-1] != ioff:
            raise SeekgzError("blocks do not end where the index starts")
        self.block_size = bs
        self.clear_size = clear
        self.offsets = offsets
    def blocks(self):
        return len(self.offsets) - 1


class SeekgzRaw(io.RawIOBase):
    # Raw reader of the G-code inside a seekable gzip memfd. Holds one
    # inflated block. Reads are refused once Klipper is shut down:
    # virtual_sdcard logs the text around the print position on shutdown.
    def __init__(self, fd, path, printer, index):
        io.RawIOBase.__init__(self)
        self.name = path    # what virtual_sdcard reports as file_path
        self._fd = fd
        self._printer = printer
        self._index = index
        self._pos = 0
        self._block = -1
        self._data = b""
    def readable(self):
        return True
    def seekable(self):
        return True
    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._index.clear_size + offset
        else:
            raise ValueError("invalid whence %r" % (whence,))
        if pos < 0:
            raise ValueError("negative seek position %d" % (pos,))
        self._pos = pos
        return pos
    def tell(self):
        return self._pos
    def readinto(self, b):
        if self._printer.is_shutdown():
            raise ShutdownRead("read refused after shutdown (encrypted file)")
        ix = self._index
        if self._pos >= ix.clear_size:
            return 0
        i = self._pos // ix.block_size
        if i != self._block:
            self._load(i)
        start = self._pos - i * ix.block_size
        n = min(len(b), len(self._data) - start)
        b[:n] = self._data[start:start + n]
        self._pos += n
        return n
    def _load(self, i):
        ix = self._index
        off, end = ix.offsets[i], ix.offsets[i + 1]
        want = min(ix.block_size, ix.clear_size - i * ix.block_size)
        self._block, self._data = -1, b""
        member = _pread(self._fd, end - off, off)
        if member[:len(BLOCK_MAGIC)] != BLOCK_MAGIC:
            raise SeekgzError("block %d is not where the index says" % (i,))
        d = zlib.decompressobj(31)
        try:
            data = d.decompress(member, want + 1)
        except zlib.error as e:
            raise SeekgzError("block %d does not inflate: %s" % (i, e))
        if len(data) != want or not d.eof or d.unused_data:
            raise SeekgzError("block %d inflates to %d bytes, not %d"
                              % (i, len(data), want))
        self._block, self._data = i, data
    def close(self):
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                io.RawIOBase.close(self)


def open_text(fd, size, path, printer):
    # The file object virtual_sdcard gets for a seekable gzip memfd: the
    # same TextIOWrapper stack the bridge builds over a plain memfd. Owns
    # fd: closes it when the index is refused, or with the file.
    try:
        index = SeekgzIndex(fd, size)
    except Exception:
        os.close(fd)
        raise
    raw = SeekgzRaw(fd, path, printer, index)
    return io.TextIOWrapper(GuardedBuffer(raw), encoding='utf-8',
                            newline='')
