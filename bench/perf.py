#!/usr/bin/env python3
"""Issue 10 benchmark: vblkd (file engines, null, malloc, poll-threads) vs qemu-storage-daemon.

    bench/perf.py [--seconds 3] [--reps 5] [--only GROUP,...] > results.md

Same client for every server (target/release/vblkd-bench, libblkio), one server at a time, servers
alternated within each point (A, B, C, A, B, C, ...), best of --reps runs per server. Every figure
that matters is a ratio taken within one point of one run. Groups:

  file    the same tmpfs image through vblkd file engine=auto (the default) / io_uring / threads,
          qemu-storage-daemon (cache.direct=off), and vblkd malloc as the reference; 1 queue
  direct  the same image on a disk file system (/var/tmp), vblkd direct=on vs qsd cache.direct=on
  null    vblkd null vs qsd null-co; 1 and 2 queues
  malloc  vblkd malloc vs qsd on a tmpfs file; 1 and 2 queues
  threads 8 queues: poll-threads=2 vs one poller per queue (malloc), 8 client threads at QD4
  poll    QD1 randread with a busy-polling client (libblkio poll queues): malloc, null, qsd null-co

Prints markdown tables (IOPS in K, p50 in µs, best run of each server) to stdout, progress and raw
JSON to stderr.
"""
import argparse
import json
import os
import shutil
import socket as socketmod
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VBLKD = os.path.join(ROOT, "target/release/vblkd")
BENCH = os.path.join(ROOT, "target/release/vblkd-bench")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def wait_socket(path, proc, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {proc.returncode}")
        if os.path.exists(path):
            s = socketmod.socket(socketmod.AF_UNIX)
            try:
                s.connect(path)
                s.close()
                time.sleep(0.05)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError(f"no socket {path}")


def vblkd(bdev, export_extra=""):
    def start(sock, queues):
        args = [VBLKD, "--control", "none", "--log-level", "warn", "--bdev", bdev,
                "--export", f"bdev=d0,socket={sock},queues={queues}{export_extra}"]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL)
    return start


def qsd(blockdev):
    def start(sock, queues):
        args = ["qemu-storage-daemon", "--blockdev", blockdev,
                "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={sock},"
                            f"writable=on,num-queues={queues}"]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start


def run_point(servers, rw, qd, queues, secs, reps, tmp, span, poll=False):
    """Returns {server name: best result dict}."""
    best = {}
    for rep in range(reps):
        for name, start in servers:
            sock = os.path.join(tmp, "s.sock")
            if os.path.exists(sock):
                os.unlink(sock)
            proc = start(sock, queues)
            try:
                wait_socket(sock, proc)
                cmd = [BENCH, "--socket", sock, "--rw", rw, "--qd", str(qd), "--queues", str(queues),
                       "--seconds", str(secs), "--span-mib", str(span)]
                if poll:
                    cmd.append("--poll")
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs * 10 + 30)
                res = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {"iops": 0}
            except Exception as e:  # a failed run counts as 0 and is logged
                log(f"  {name}: {e}")
                res = {"iops": 0, "p50_us": 0}
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log(json.dumps({"server": name, "rw": rw, "qd": qd, "queues": queues, "rep": rep, "result": res}))
            if name not in best or res.get("iops", 0) > best[name].get("iops", 0):
                best[name] = res
    return best


def fmt(r):
    return f"{r.get('iops', 0) / 1000:.0f} K ({r.get('p50_us', 0):.1f})"


def table(title, points, names, ref, secs, reps, tmp, span, poll=False):
    print(f"\n#### {title}\n")
    head = "| pattern | QD | queues | " + " | ".join(f"{n} IOPS (p50 µs)" for n in names)
    head += " | " + " | ".join(f"{n} / {ref}" for n in names if n != ref) + " |"
    print(head)
    print("|" + "---|" * (3 + len(names) + len(names) - 1))
    for rw, qd, queues, servers in points:
        log(f"point {title}: {rw} QD{qd} x{queues}")
        best = run_point(servers, rw, qd, queues, secs, reps, tmp, span, poll)
        base = best[ref].get("iops", 0) or 1
        cells = [fmt(best[n]) for n in names]
        ratios = [f"{best[n].get('iops', 0) / base:.2f}" for n in names if n != ref]
        print(f"| {rw} | {qd} | {queues} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", default="file,direct,null,malloc,threads,poll")
    a = ap.parse_args()
    groups = a.only.split(",")
    subprocess.run(["cargo", "build", "--release", "--bin", "vblkd", "--bin", "vblkd-bench"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="vblkd-perf-")
    shm = tempfile.mkdtemp(prefix="vblkd-perf-", dir="/dev/shm")
    disk = tempfile.mkdtemp(prefix="vblkd-perf-", dir="/var/tmp")
    try:
        cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
        print(f"{os.cpu_count()} CPUs ({cpu}), kernel {os.uname().release}, {time.strftime('%Y-%m-%d %H:%M')}, "
              f"{a.seconds:g} s per run, best of {a.reps} alternating runs per server; load average at start "
              f"{os.getloadavg()[0]:.1f} (machine shared with other jobs)")
        pts = [(rw, qd) for rw in ("randread", "randwrite") for qd in (1, 32)]
        if "file" in groups:
            img = os.path.join(shm, "file.img")
            subprocess.run(["truncate", "-s", "1G", img], check=True)
            f = f"driver=file,name=d0,path={img}"
            servers = [("auto", vblkd(f)), ("io_uring", vblkd(f + ",engine=io_uring")),
                       ("threads", vblkd(f + ",engine=threads")), ("malloc", vblkd("driver=malloc,name=d0,size=1G")),
                       ("qsd", qsd(f"driver=file,node-name=d0,filename={img},cache.direct=off"))]
            table("Same tmpfs image: vblkd file engines vs qemu-storage-daemon (1 queue)",
                  [(rw, qd, 1, servers) for rw, qd in pts], [n for n, _ in servers], "qsd",
                  a.seconds, a.reps, tmp, 1024)
        if "direct" in groups:
            img = os.path.join(disk, "direct.img")
            subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", "count=512", "oflag=direct", "status=none"],
                           check=True)
            servers = [("vblkd direct=on", vblkd(f"driver=file,name=d0,path={img},direct=on")),
                       ("qsd cache.direct=on", qsd(f"driver=file,node-name=d0,filename={img},cache.direct=on"))]
            table("Same disk image (/var/tmp, O_DIRECT): vblkd direct=on vs qsd cache.direct=on (1 queue)",
                  [(rw, qd, 1, servers) for rw, qd in pts], [n for n, _ in servers], "qsd cache.direct=on",
                  a.seconds, a.reps, tmp, 512)
        if "null" in groups:
            servers = [("vblkd null", vblkd("driver=null,name=d0,size=1G")),
                       ("qsd null-co", qsd("driver=null-co,node-name=d0,size=1073741824,read-zeroes=on"))]
            table("vblkd null vs qsd null-co", [(rw, qd, q, servers) for rw, qd in pts for q in (1, 2)],
                  [n for n, _ in servers], "qsd null-co", a.seconds, a.reps, tmp, 1024)
        if "malloc" in groups:
            img = os.path.join(shm, "qsd.img")
            subprocess.run(["truncate", "-s", "1G", img], check=True)
            servers = [("vblkd malloc", vblkd("driver=malloc,name=d0,size=1G")),
                       ("qsd tmpfs", qsd(f"driver=file,node-name=d0,filename={img},cache.direct=off"))]
            table("vblkd malloc vs qsd on a tmpfs file", [(rw, qd, q, servers) for rw, qd in pts for q in (1, 2)],
                  [n for n, _ in servers], "qsd tmpfs", a.seconds, a.reps, tmp, 1024)
        if "threads" in groups:
            m = "driver=malloc,name=d0,size=1G"
            servers = [("2 poller threads", vblkd(m, ",poll-threads=2")), ("8 poller threads", vblkd(m))]
            table("8 queues: poll-threads=2 vs one poller per queue (malloc, QD4 per queue)",
                  [(rw, 4, 8, servers) for rw in ("randread", "randwrite")], [n for n, _ in servers],
                  "8 poller threads", a.seconds, a.reps, tmp, 1024)
        if "poll" in groups:
            servers = [("vblkd malloc", vblkd("driver=malloc,name=d0,size=1G")),
                       ("vblkd null", vblkd("driver=null,name=d0,size=1G")),
                       ("qsd null-co", qsd("driver=null-co,node-name=d0,size=1073741824,read-zeroes=on"))]
            table("Busy-polling client (libblkio poll queues), QD1", [("randread", 1, 1, servers)],
                  [n for n, _ in servers], "qsd null-co", a.seconds, a.reps, tmp, 1024, poll=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


if __name__ == "__main__":
    main()
