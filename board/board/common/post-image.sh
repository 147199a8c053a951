#!/bin/bash
# Buildroot post-image: one A/B slot (firmware, kernel, initramfs, config, cmdline), the
# autoboot.txt sector, and genimage (docs/OTA.md).  $1 = BINARIES_DIR, $2 = board.
set -euo pipefail
BOARD=$2
BOARD_DIR="$BR2_EXTERNAL_BORGIOS_PATH/board/$BOARD"
cd "$BINARIES_DIR"
cp "$BOARD_DIR/cmdline.txt" rpi-firmware/cmdline.txt
# autoboot.txt: exactly one 512-byte sector, rendered as borg_ota::autoboot does.
python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import abdisk; open("autoboot.txt", "wb").write(abdisk.autoboot(2, 3))' \
  "$BR2_EXTERNAL_BORGIOS_PATH/../image"
FILES=()
for i in *.dtb rpi-firmware/* Image rootfs.cpio.gz; do FILES+=("$i"); done
SLOT_FILES=$(printf '\t\t\t"%s",\n' "${FILES[@]}")
sed "s|#SLOT_FILES#|${SLOT_FILES}|" "$BOARD_DIR/genimage.cfg" > genimage.cfg
ROOTPATH_TMP=$(mktemp -d); trap 'rm -rf "$ROOTPATH_TMP"' EXIT
rm -rf "$BUILD_DIR/genimage.tmp"
genimage --rootpath "$ROOTPATH_TMP" --tmppath "$BUILD_DIR/genimage.tmp" \
  --inputpath "$BINARIES_DIR" --outputpath "$BINARIES_DIR" --config genimage.cfg
echo "BorgIOS SD image: $BINARIES_DIR/sdcard.img (release image: $BINARIES_DIR/slot.vfat)"
