#!/usr/bin/env python3
"""Independent reader of a cryptnbd volume header, written from docs/format.md alone.

Usage: decode-header.py FILE
FILE is either one encoded header copy (as tests/data/volume-header-v1.bin) or a whole volume file
(>= 1 MiB): then both copies (offsets 0 and 524288) are decoded and the valid one with the higher
generation is shown, as the format requires. Prints `field: value` lines; exits 1 with a message on
standard error when no copy is valid. Standard library only (crc32c is computed here).
"""
import struct
import sys
import uuid

MAGIC = b"CRYPTNBD"
FIXED_LEN = 136
MAX_HEADER_LEN = 65536
HEADER_REGION = 1 << 20
COPY_OFFSETS = (0, 512 * 1024)


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


class Invalid(Exception):
    pass


def decode_copy(buf):
    if len(buf) < 20:
        raise Invalid("shorter than 20 bytes")
    if buf[0:8] != MAGIC:
        raise Invalid("no magic")
    version, length, stored = struct.unpack_from("<III", buf, 8)
    if not 20 <= length <= MAX_HEADER_LEN or length > len(buf):
        raise Invalid("impossible length %d" % length)
    body = bytearray(buf[:length])
    body[16:20] = b"\0\0\0\0"
    if crc32c(bytes(body)) != stored:
        raise Invalid("checksum mismatch")
    if version not in (1, 2):
        raise Invalid("unsupported format version %d" % version)
    if length < FIXED_LEN:
        raise Invalid("length %d below the fixed part" % length)
    b = bytes(buf[:length])
    (flags, generation) = struct.unpack_from("<IQ", b, 20)
    volume_id = uuid.UUID(bytes=b[32:48])
    (size, sector_size, _reserved, data_offset, created) = struct.unpack_from("<QIIQQ", b, 48)
    cipher = b[80:96].rstrip(b"\0").decode()
    tweak = b[96:112].rstrip(b"\0").decode()
    cmk_id = uuid.UUID(bytes=b[112:128])
    (cmk_version, wlen, count) = struct.unpack_from("<IHH", b, 128)
    pos = FIXED_LEN
    if pos + wlen > length:
        raise Invalid("wrapped key runs past the end")
    wrapped = b[pos:pos + wlen]
    pos += wlen
    context = []
    for _ in range(count):
        pair = []
        for _ in range(2):
            if pos + 2 > length:
                raise Invalid("context runs past the end")
            (n,) = struct.unpack_from("<H", b, pos)
            pos += 2
            if pos + n > length:
                raise Invalid("context runs past the end")
            pair.append(b[pos:pos + n].decode())
            pos += n
        context.append(tuple(pair))
    layered = []
    if version == 2:
        if pos + 17 > length:
            raise Invalid("layer fields run past the end")
        layered.append(("layer_id", uuid.UUID(bytes=b[pos:pos + 16])))
        marker = b[pos + 16]
        pos += 17
        if marker == 1:
            if pos + 42 > length:
                raise Invalid("parent runs past the end")
            layered.append(("parent_volume_id", uuid.UUID(bytes=b[pos:pos + 16])))
            layered.append(("parent_layer_id", uuid.UUID(bytes=b[pos + 16:pos + 32])))
            (psize, plen) = struct.unpack_from("<QH", b, pos + 32)
            pos += 42
            if pos + plen > length:
                raise Invalid("parent name runs past the end")
            layered.append(("parent_size", psize))
            layered.append(("parent_name", b[pos:pos + plen].decode()))
            pos += plen
        elif marker != 0:
            raise Invalid("parent marker %d" % marker)
    if pos != length:
        raise Invalid("%d trailing bytes" % (length - pos))
    if data_offset != HEADER_REGION:
        raise Invalid("data offset %d" % data_offset)
    fields = [
        ("format_version", version),
        ("generation", generation),
        ("volume_id", volume_id),
        ("size", size),
        ("sector_size", sector_size),
        ("discard", bool(flags & 1)),
        ("data_offset", data_offset),
        ("created", created),
        ("cipher", cipher),
        ("tweak", tweak),
        ("cmk_id", cmk_id),
        ("cmk_version", cmk_version),
        ("wrapped_dek_len", wlen),
    ]
    if wlen >= 25 and wrapped[0:4] == b"CNDK":
        fields.append(("wrapped_dek_format", wrapped[4]))
        fields.append(("wrapped_dek_cmk_id", uuid.UUID(bytes=wrapped[5:21])))
        fields.append(("wrapped_dek_cmk_version", struct.unpack(">I", wrapped[21:25])[0]))
    for k, v in context:
        fields.append(("context." + k, v))
    fields.extend(layered)
    fields.append(("checksum", "ok"))
    return generation, fields


def main():
    if len(sys.argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    with open(sys.argv[1], "rb") as f:
        data = f.read(HEADER_REGION)
    if len(data) < HEADER_REGION:
        copies = [(0, data)]
    else:
        copies = [(o, data[o:o + MAX_HEADER_LEN]) for o in COPY_OFFSETS]
    best = None
    for offset, buf in copies:
        try:
            gen, fields = decode_copy(buf)
        except Invalid as e:
            sys.stderr.write("copy at %d: %s\n" % (offset, e))
            continue
        if best is None or gen > best[0]:
            best = (gen, offset, fields)
    if best is None:
        sys.stderr.write("no valid header copy\n")
        return 1
    print("copy_offset: %d" % best[1])
    for k, v in best[2]:
        print("%s: %s" % (k, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
