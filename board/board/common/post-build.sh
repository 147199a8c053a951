#!/bin/sh
# Buildroot post-build: make the target tree a BorgIOS root.  $1 = TARGET_DIR, $2 = board.
set -eu
TARGET_DIR=$1
# No shells, no logins: remove what a default skeleton may have left behind.
rm -f "$TARGET_DIR/etc/inittab" "$TARGET_DIR/etc/init.d/rcS" "$TARGET_DIR/etc/init.d/rcK"
mkdir -p "$TARGET_DIR/data" "$TARGET_DIR/run" "$TARGET_DIR/tmp"
# /etc/passwd and /etc/group come from overlay/ (user borg = 1000:1000 runs the cells).
test -x "$TARGET_DIR/usr/bin/borg"
