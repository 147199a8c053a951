#!/usr/bin/env python3
"""The A/B boot disk of the QEMU image (docs/OTA.md "A/B boot"), with mtools only.

Layout (MBR, like the Pi's SD card minus its data partition, which QEMU keeps on its own disk):
  1  FAT16 16 MiB "BORGBOOT": autoboot.txt and tryboot.txt, each exactly one 512-byte sector
  2  slot A, FAT16 SLOT_MB: vmlinuz, initrd.img, cmdline.txt
  3  slot B, the same

  abdisk.py make-slot SLOT.vfat VMLINUZ INITRD CMDLINE   a slot image (what a release ships)
  abdisk.py make DISK SLOT.vfat          the disk, slot A = SLOT.vfat, slot B = a copy, A committed
  abdisk.py show DISK                    committed slot, tryboot slot, tryboot flag
  abdisk.py tryboot DISK 0|1             clear or set the one-shot tryboot flag
  abdisk.py write-slot DISK 2|3 SLOT.vfat  copy a slot image into partition 2 or 3
  abdisk.py extract DISK 2|3 DIR         copy a slot's vmlinuz, initrd.img, cmdline.txt to DIR

The two one-sector files are rendered here the way borg_ota::autoboot renders them (text, a
'#', spaces, a newline: 512 bytes); the guest rewrites them in place and this tool, standing
in for the Pi firmware, reads them with its own strict parser.
"""
import os
import shutil
import struct
import subprocess
import sys
import tempfile

SECTOR = 512
MIB = 1 << 20
BOOT_MB = 16
SLOT_MB = int(os.environ.get("BORG_SLOT_MB", "64"))
OFFSET_MB = 1


def pad(text: str) -> bytes:
    b = text.encode()
    return b + b"#" + b" " * (SECTOR - len(b) - 2) + b"\n"


def autoboot(boot: int, tryboot: int) -> bytes:
    return pad(f"[all]\ntryboot_a_b=1\nboot_partition={boot}\n[tryboot]\nboot_partition={tryboot}\n")


def parse_autoboot(data: bytes):
    """(boot_partition, tryboot_partition), or raise ValueError: strict, like the firmware
    should be (a damaged file is never taken for a choice)."""
    section, seen, ab = None, {}, False
    for line in data.decode("utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            if section not in ("all", "tryboot"):
                raise ValueError(f"unknown section {line}")
            continue
        k, _, v = line.partition("=")
        if section == "all" and k == "tryboot_a_b" and v == "1":
            ab = True
        elif k == "boot_partition" and section in ("all", "tryboot") and v in ("2", "3"):
            if section in seen:
                raise ValueError(f"boot_partition twice in [{section}]")
            seen[section] = int(v)
        else:
            raise ValueError(f"unexpected {line!r}")
    if not ab or "all" not in seen or "tryboot" not in seen or seen["all"] == seen["tryboot"]:
        raise ValueError("incomplete autoboot.txt")
    return seen["all"], seen["tryboot"]


def partitions(disk: str):
    with open(disk, "rb") as f:
        mbr = f.read(SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        raise ValueError(f"{disk}: no MBR")
    out = {}
    for n in range(1, 5):
        e = 446 + 16 * (n - 1)
        start, count = struct.unpack_from("<II", mbr, e + 8)
        if count:
            out[n] = (start * SECTOR, count * SECTOR)
    return out


def mtools_img(disk: str, part: int) -> str:
    return f"{disk}@@{partitions(disk)[part][0]}"


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def mkfs(path: str, mb: int, label: str):
    if os.path.exists(path):
        os.remove(path)
    run("mkfs.vfat", "-F", "16", "-n", label, "-C", path, str(mb * 1024), stdout=subprocess.DEVNULL)


def mput(img: str, name: str, data: bytes):
    with tempfile.NamedTemporaryFile() as t:
        t.write(data)
        t.flush()
        run("mcopy", "-o", "-i", img, t.name, f"::/{name}")


def mget(img: str, name: str) -> bytes:
    return run("mtype", "-i", img, f"::/{name}", stdout=subprocess.PIPE,
               stderr=subprocess.DEVNULL).stdout


def make_slot(slot: str, vmlinuz: str, initrd: str, cmdline: str):
    mkfs(slot, SLOT_MB, "BORGSLOT")
    run("mcopy", "-i", slot, vmlinuz, "::/vmlinuz")
    run("mcopy", "-i", slot, initrd, "::/initrd.img")
    mput(slot, "cmdline.txt", (cmdline.strip() + "\n").encode())


def make(disk: str, slot: str):
    if os.path.getsize(slot) > SLOT_MB * MIB:
        raise SystemExit(f"{slot} is larger than a {SLOT_MB} MiB slot")
    total = OFFSET_MB + BOOT_MB + 2 * SLOT_MB + 1
    with open(disk, "wb") as f:
        f.truncate(total * MIB)
    starts = [OFFSET_MB, OFFSET_MB + BOOT_MB, OFFSET_MB + BOOT_MB + SLOT_MB]
    sizes = [BOOT_MB, SLOT_MB, SLOT_MB]
    table = "label: dos\n" + "".join(
        f"start={s}MiB, size={z}MiB, type=e\n" for s, z in zip(starts, sizes))
    run("sfdisk", "--quiet", disk, input=table.encode())
    with tempfile.TemporaryDirectory() as d:
        boot = os.path.join(d, "boot.vfat")
        mkfs(boot, BOOT_MB, "BORGBOOT")
        # Written first to a fresh FAT: each file is one sector in the root directory's first
        # cluster, where the guest's locator looks.
        mput(boot, "autoboot.txt", autoboot(2, 3))
        mput(boot, "tryboot.txt", pad("tryboot=0\n"))
        write_part(disk, 1, boot)
    write_part(disk, 2, slot)
    write_part(disk, 3, slot)


def write_part(disk: str, part: int, image: str):
    start, size = partitions(disk)[part]
    if os.path.getsize(image) > size:
        raise SystemExit(f"{image} does not fit partition {part}")
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(start)
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def show(disk: str):
    img = mtools_img(disk, 1)
    boot, tryb = parse_autoboot(mget(img, "autoboot.txt"))
    try:  # the Pi's SD card has none: its firmware keeps the flag itself
        flag = mget(img, "tryboot.txt").split(b"\n", 1)[0].strip() == b"tryboot=1"
    except subprocess.CalledProcessError:
        flag = False
    return boot, tryb, flag


def set_tryboot(disk: str, on: bool):
    mput(mtools_img(disk, 1), "tryboot.txt", pad("tryboot=1\n" if on else "tryboot=0\n"))


def extract(disk: str, part: int, out: str):
    img = mtools_img(disk, part)
    for name in ("vmlinuz", "initrd.img", "cmdline.txt"):
        run("mcopy", "-o", "-n", "-i", img, f"::/{name}", os.path.join(out, name),
            stderr=subprocess.DEVNULL)


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "make-slot" and len(args) == 4:
        make_slot(*args)
    elif cmd == "make" and len(args) == 2:
        make(*args)
    elif cmd == "show" and len(args) == 1:
        boot, tryb, flag = show(args[0])
        print(f"committed={boot} tryboot={tryb} flag={int(flag)}")
    elif cmd == "tryboot" and len(args) == 2 and args[1] in ("0", "1"):
        set_tryboot(args[0], args[1] == "1")
    elif cmd == "write-slot" and len(args) == 3 and args[1] in ("2", "3"):
        write_part(args[0], int(args[1]), args[2])
    elif cmd == "extract" and len(args) == 3 and args[1] in ("2", "3"):
        extract(args[0], int(args[1]), args[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
