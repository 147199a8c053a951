#!/bin/bash
# Buildroot post-image: boot files for both slots + genimage.  $1 = BINARIES_DIR, $2 = board.
set -euo pipefail
BOARD=$2
BOARD_DIR="$BR2_EXTERNAL_BORGIOS_PATH/board/$BOARD"
cd "$BINARIES_DIR"
cp Image Image-a
cp Image Image-b
cp "$BOARD_DIR/cmdline-a.txt" "$BOARD_DIR/cmdline-b.txt" rpi-firmware/
FILES=()
for i in *.dtb rpi-firmware/* Image-a Image-b; do FILES+=("$i"); done
BOOT_FILES=$(printf '\t\t\t"%s",\n' "${FILES[@]}")
sed "s|#BOOT_FILES#|${BOOT_FILES}|" "$BOARD_DIR/genimage.cfg" > genimage.cfg
ROOTPATH_TMP=$(mktemp -d); trap 'rm -rf "$ROOTPATH_TMP"' EXIT
rm -rf "$BUILD_DIR/genimage.tmp"
genimage --rootpath "$ROOTPATH_TMP" --tmppath "$BUILD_DIR/genimage.tmp" \
  --inputpath "$BINARIES_DIR" --outputpath "$BINARIES_DIR" --config genimage.cfg
echo "BorgIOS SD image: $BINARIES_DIR/sdcard.img"
