#!/usr/bin/env bash
# CPU side of the GPU recipe: fetch the wheels the GPU machines lack (bench/gpu/wheels.txt, for
# python 3.12 manylinux x86-64), pack them into one tar and cut it into parts of at most
# IBOT_GPU_PART_MB MiB, one part per folder .gpu_carry/pK: one device call carries one folder
# (64 MiB per call, working tree included). bench/gpu/README.md has the whole sequence.
#
#   bash bench/gpu/prepare_wheels.sh             # download + cut
#   bash bench/gpu/prepare_wheels.sh --from DIR  # cut the wheels already in DIR (no network)
#   bash bench/gpu/prepare_wheels.sh --dry-run   # print what would be done
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LIST="$ROOT/bench/gpu/wheels.txt"
STAGE=${IBOT_GPU_STAGE:-$ROOT/.gpu_wheels}
CARRY=${IBOT_GPU_CARRY:-$ROOT/.gpu_carry}
# A call carries the working tree too (64 MiB in all): by default a part is what the tracked
# files leave of 62 MiB (about 52 MiB today), at most 55.
if [ -z "${IBOT_GPU_PART_MB:-}" ]; then
  tree=$(git -C "$ROOT" ls-files -z 2>/dev/null | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) \
         | tail -1 | cut -f1)
  PART_MB=$(( (62 * 1048576 - ${tree:-10485760}) / 1048576 ))
  [ "$PART_MB" -le 55 ] || PART_MB=55
  [ "$PART_MB" -ge 8 ] || { echo "prepare_wheels.sh: the working tree leaves no room for parts" >&2; exit 1; }
else
  PART_MB=$IBOT_GPU_PART_MB
fi
FROM=""
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "prepare_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if [ "$DRY" = 1 ]; then
  echo "packages:"; grep -v '^\s*#' "$LIST" | grep -v '^\s*$' | sed 's/^/  /'
  echo "download: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12" \
       "--implementation cp ${PLATFORMS[*]} -d $STAGE -r $LIST"
  echo "pack: $STAGE/*.whl -> wheels.tar, cut into ${PART_MB} MiB parts under $CARRY/p1, p2, ..."
  exit 0
fi

if [ -n "$FROM" ]; then
  STAGE=$FROM
else
  mkdir -p "$STAGE"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$STAGE" -r "$LIST"
fi
shopt -s nullglob
wheels=("$STAGE"/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "prepare_wheels.sh: no .whl files in $STAGE" >&2; exit 1; }

if [ -e "$CARRY" ]; then  # only ever delete an earlier run's parts
  stray=$(find "$CARRY" -mindepth 1 -maxdepth 1 ! -name 'p[0-9]*' ! -name tmp | head -1)
  [ -z "$stray" ] || { echo "prepare_wheels.sh: $CARRY holds $stray: not a carry folder" >&2; exit 1; }
  rm -rf "$CARRY"
fi
mkdir -p "$CARRY/tmp"
tar -C "$STAGE" -cf "$CARRY/tmp/wheels.tar" $(cd "$STAGE" && ls *.whl)
sha=$(sha256sum "$CARRY/tmp/wheels.tar" | cut -d' ' -f1)
split -b "${PART_MB}M" -d -a 2 "$CARRY/tmp/wheels.tar" "$CARRY/tmp/part."
n=0
for part in "$CARRY"/tmp/part.*; do
  n=$((n + 1))
  mkdir -p "$CARRY/p$n"
  mv "$part" "$CARRY/p$n/wheels.tar.$(printf '%02d' $((n - 1)))"
done
for k in $(seq 1 $n); do  # every folder carries the manifest: any of them may arrive last
  printf 'sha256 %s\nparts %d\n' "$sha" "$n" > "$CARRY/p$k/MANIFEST"
done
rm -rf "$CARRY/tmp"
echo "prepare_wheels.sh: ${#wheels[@]} wheels, $(du -sh "$STAGE" | cut -f1) -> $n parts of" \
     "<= ${PART_MB} MiB: carry $CARRY/p1 .. $CARRY/p$n, one per device call" \
     "(bash bench/gpu/run.sh stash), the last with: stash install"
