#!/usr/bin/python3
"""Crash-consistency client for cryptnbd (run by Debian's /usr/bin/python3, which has libnbd's `nbd`).

One call is one round: verify what the previous round left (against the state file), then write
through several libnbd connections until the server dies (or --seconds pass), then save what was
written and what was promised durable into the state file for the next round.

The region is cut into 512-byte pieces. Every piece is either all zeroes (generation 0: never
written, or written with NBD_CMD_WRITE_ZEROES) or the pattern of one write generation, which names
the piece and the generation, so a read tells exactly which write a piece holds, and anything
else (ciphertext decrypted with the wrong tweak, a torn or misplaced sector) is garbage.

Each connection owns its own slice of the region and writes it in order, so for every piece the
history since its last durable write is a list. A write is durable once acknowledged with FUA, or
once a FLUSH sent after its acknowledgement is acknowledged (multi-conn: a FLUSH on any connection
covers writes acknowledged on all of them). After a crash a piece must hold its last durable
generation or one written after it: an older one is a LOST write, anything else is GARBAGE.

Usage: durability_client.py URI STATE READY_FILE [--seconds N] [--verify-only] [--seed N]
Prints one JSON line of counts; exits 1 if anything was lost or garbage.
"""

import argparse
import json
import os
import random
import struct
import sys
import threading
import time

import nbd

PIECE = 512
CONNS = 4
PIECES_PER_CONN = 1024  # 512 KiB per connection, 2 MiB in all
TOTAL = CONNS * PIECES_PER_CONN


def pattern(piece, gen):
    if gen == 0:
        return bytes(PIECE)
    unit = struct.pack("<QQ", piece ^ 0x5EED5EED, gen)
    return unit * (PIECE // len(unit))


def identify(piece, data):
    """The generation `data` holds for `piece`, or None for garbage."""
    if data == bytes(PIECE):
        return 0
    p, gen = struct.unpack_from("<QQ", data)
    if p != piece ^ 0x5EED5EED or gen == 0 or data != pattern(piece, gen):
        return None
    return gen


def connect(uri):
    h = nbd.NBD()
    # Sub-sector writes must reach the server: it does the read-modify-write, which is what we test.
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    h.connect_uri(uri)
    return h


class State:
    def __init__(self, d):
        self.next_gen = d.get("next_gen", 1)
        self.durable = d.get("durable", [0] * TOTAL)
        # per piece: [[gen, ack_seq or None, write id], ...] written after the durable one, oldest first
        self.hist = d.get("hist", [[] for _ in range(TOTAL)])
        self.totals = d.get(
            "totals",
            {"acked": 0, "durable": 0, "rounds": 0, "verified": 0, "lost": 0, "garbage": 0},
        )
        self.lock = threading.Lock()
        self.ack_seq = 0

    def to_json(self):
        return {
            "next_gen": self.next_gen,
            "durable": self.durable,
            "hist": self.hist,
            "totals": self.totals,
        }

    def begin(self, pieces, gen_is_zero):
        with self.lock:
            gen = 0 if gen_is_zero else self.next_gen
            self.next_gen += 1
            wid = self.next_gen
            entries = []
            for p in pieces:
                e = [gen, None, wid]
                self.hist[p].append(e)
                entries.append((p, e))
            return gen, entries

    def acked(self, entries, fua):
        with self.lock:
            self.ack_seq += 1
            self.totals["acked"] += 1
            for _, e in entries:
                e[1] = self.ack_seq
            if fua:
                self.totals["durable"] += 1
                for p, e in entries:
                    self.make_durable(p, e)

    def make_durable(self, p, e):
        h = self.hist[p]
        i = next(i for i, x in enumerate(h) if x is e)
        self.durable[p] = e[0]
        del h[: i + 1]

    def flush_started(self):
        with self.lock:
            return self.ack_seq

    def flushed(self, before):
        """Every write acknowledged at or before ack number `before` is now durable."""
        with self.lock:
            covered = set()
            for p in range(TOTAL):
                h = self.hist[p]
                last = None
                for e in h:
                    if e[1] is not None and e[1] <= before:
                        last = e
                        covered.add(e[2])
                if last is not None:
                    self.make_durable(p, last)
            self.totals["durable"] += len(covered)


def verify(uri, st):
    h = connect(uri)
    data = h.pread(TOTAL * PIECE, 0)
    h.shutdown()
    verified = newer = lost = garbage = 0
    problems = []
    for p in range(TOTAL):
        got = identify(p, data[p * PIECE : (p + 1) * PIECE])
        allowed = [st.durable[p]] + [e[0] for e in st.hist[p]]
        if got is not None and got in allowed:
            verified += 1
            if got != st.durable[p]:
                newer += 1
            st.durable[p] = got
            st.hist[p] = []
        elif got is None:
            garbage += 1
            problems.append("piece %d: garbage (durable gen %d, later %s)" % (p, st.durable[p], allowed[1:]))
        else:
            lost += 1
            problems.append("piece %d: holds gen %d, but gen %d was durable (later %s)" % (p, got, st.durable[p], allowed[1:]))
    st.totals["verified"] += verified
    st.totals["lost"] += lost
    st.totals["garbage"] += garbage
    return {"verified": verified, "newer_than_durable": newer, "lost": lost, "garbage": garbage, "problems": problems[:20]}


def writer(uri, st, c, rng, stop, deadline, errors):
    try:
        h = connect(uri)
    except Exception as e:  # the server was killed before we connected
        errors.append("connect: %r" % e)
        stop.set()
        return
    base = c * PIECES_PER_CONN
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            r = rng.random()
            if r < 0.03:
                before = st.flush_started()
                h.flush()
                st.flushed(before)
                continue
            n = rng.choice([1, 1, 2, 3, 8, 8, 16, 24])
            first = base + rng.randrange(PIECES_PER_CONN - n + 1)
            pieces = list(range(first, first + n))
            fua = rng.random() < 0.2
            flags = nbd.CMD_FLAG_FUA if fua else 0
            if r < 0.11:
                gen, entries = st.begin(pieces, True)
                h.zero(n * PIECE, first * PIECE, flags)
            else:
                gen, entries = st.begin(pieces, False)
                buf = b"".join(pattern(p, gen) for p in pieces)
                h.pwrite(buf, first * PIECE, flags)
            st.acked(entries, fua)
    except Exception as e:
        errors.append("conn %d: %r" % (c, e))
        stop.set()
    try:
        h.shutdown()
    except Exception:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("state")
    ap.add_argument("ready")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--verify-only", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()

    d = {}
    if os.path.exists(a.state):
        with open(a.state) as f:
            d = json.load(f)
    st = State(d)
    v = verify(a.uri, st)
    out = {"round": st.totals["rounds"], "check": v}
    if not a.verify_only:
        with open(a.ready, "w") as f:
            f.write("writing\n")
        seed = a.seed if a.seed is not None else random.randrange(1 << 32)
        stop = threading.Event()
        errors = []
        deadline = time.monotonic() + a.seconds
        acked0, durable0 = st.totals["acked"], st.totals["durable"]
        threads = [
            threading.Thread(target=writer, args=(a.uri, st, c, random.Random(seed * 31 + c), stop, deadline, errors))
            for c in range(CONNS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st.totals["rounds"] += 1
        out["seed"] = seed
        out["acked"] = st.totals["acked"] - acked0
        out["durable"] = st.totals["durable"] - durable0
        out["stopped_by"] = errors[0] if errors else "time"
    out["totals"] = st.totals
    tmp = a.state + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st.to_json(), f)
    os.replace(tmp, a.state)
    print(json.dumps(out), flush=True)
    sys.exit(1 if v["lost"] or v["garbage"] else 0)


if __name__ == "__main__":
    main()
