#!/usr/bin/env python3
"""Copy kernel modules and their dependencies into an initramfs, with a load-order file.

usage: modules.py KMOD_DIR DEST_DIR module [module...]
KMOD_DIR is lib/modules/<version> (with modules.dep, from depmod). Modules that are built in
(absent from modules.dep) are reported and skipped. borg init loads DEST_DIR/load-order with
finit_module(2), dependencies first.
"""
import os
import shutil
import sys

kmod, dest, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
deps, byname = {}, {}
for line in open(os.path.join(kmod, "modules.dep")):
    mod, _, rest = line.partition(":")
    deps[mod] = rest.split()
    byname[os.path.basename(mod).split(".ko")[0].replace("-", "_")] = mod
order = []


def visit(m):
    if m in order:
        return
    for d in reversed(deps.get(m, [])):
        visit(d)
    order.append(m)


for w in wanted:
    if w in byname:
        visit(byname[w])
    else:
        print(f"  {w}: built in (or absent)", file=sys.stderr)
os.makedirs(dest, exist_ok=True)
with open(os.path.join(dest, "load-order"), "w") as f:
    f.write("# kernel modules borg init loads (finit_module), dependencies first\n")
    for m in order:
        name = os.path.basename(m)
        shutil.copy(os.path.join(kmod, m), os.path.join(dest, name))
        f.write(name + "\n")
print("  modules: " + " ".join(os.path.basename(m) for m in order), file=sys.stderr)
