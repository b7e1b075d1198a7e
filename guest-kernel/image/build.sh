#!/usr/bin/env bash
# Build the MPI job image: a Debian root filesystem made with mmdebstrap from the
# packages in mpi.packages (Open MPI, HPCC, NetPIPE), as an ext4 file.
#
#   build.sh               build (or reuse) the image; the LAST line of stdout is
#                          the path of the .ext4 file
#   build.sh --print-path  print the path the image has (or would have), build nothing
#
# Packages come from the apt sources this machine is configured with (every file
# under /etc/apt/sources.list{,.d}), for the host's own Debian release, so that a
# program built on the host with mpicc runs in the image. Nothing of hpcvm goes in:
# the agent comes from the initramfs, as for any vendor's image.
#
# The result is cached at ${HPCVM_CACHE:-$HOME/.cache/hpcvm}/mpi-<hash>.ext4, where
# <hash> is the sha256 of mpi.packages, this script and the versions apt would
# install; when that file exists the script only prints its path. Run as root on a
# fresh Debian machine: it installs mmdebstrap with apt-get. Progress goes to stderr.
set -euo pipefail
export LC_ALL=C

exec 3>&1 1>&2          # stdout is reserved for the final path (fd 3)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIST=$HERE/mpi.packages
CACHE=${HPCVM_CACHE:-$HOME/.cache/hpcvm}

die() { echo "image/build.sh: error: $*"; exit 1; }
log() { echo "image/build.sh: $*"; }

print_path=0
case "${1:-}" in
    "") ;;
    --print-path) print_path=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&3; exit 0 ;;
    *) die "unknown argument '$1' (usage: build.sh [--print-path])" ;;
esac

mapfile -t PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
[ "${#PACKAGES[@]}" -gt 0 ] || die "$LIST lists no packages"

# The host's release, and the sources apt uses here (no mirror is named in the project).
SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$SUITE" ] || die "cannot tell this host's Debian release from /etc/os-release"
shopt -s nullglob
SOURCES=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
shopt -u nullglob
EXISTING=()
for f in "${SOURCES[@]}"; do
    [ -s "$f" ] && grep -q '^[^#]' "$f" && EXISTING+=("$f")
done
[ "${#EXISTING[@]}" -gt 0 ] || die "no apt sources configured under /etc/apt"

versions() {
    apt-cache policy "${PACKAGES[@]}" 2>/dev/null | awk '$1 == "Candidate:" { print $2 }'
}
key=$( { cat "$LIST" "${BASH_SOURCE[0]}"; echo "$SUITE"; versions; } | sha256sum | cut -c1-16)
OUT=$CACHE/mpi-$key.ext4
if [ "$print_path" = 1 ] || [ -f "$OUT" ]; then
    echo "$OUT" >&3
    exit 0
fi

if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap"
    apt-get update
    apt-get install -y --no-install-recommends mmdebstrap
fi
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is missing (apt-get install e2fsprogs)"

mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/hpcvm-image.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
log "building the MPI image for $SUITE: ${PACKAGES[*]} (a few minutes; cached after)"
# essential + the listed packages and what they depend on; docs, man pages and
# locales left out. apt's lists and cache are removed from the result.
mmdebstrap --variant=essential --verbose \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$WORK/root" "${EXISTING[@]}"

# The job's working directory is mounted over the same path in the guest; an
# empty, world-writable /scratch is there for jobs without a shared directory.
install -d -m 1777 "$WORK/root/scratch"
used=$(du -s --block-size=1M "$WORK/root" | cut -f1)
size=$(( used + used / 4 + 64 ))
log "making the ext4 image: ${used} MiB of files in ${size} MiB"
mkfs.ext4 -q -F -L hpcvm-mpi -E root_owner=0:0 -d "$WORK/root" "$WORK/image.ext4" "${size}M"
mv "$WORK/image.ext4" "$OUT.new" && mv "$OUT.new" "$OUT"
log "done in $(( $(date +%s) - start )) s: $OUT"
echo "$OUT" >&3
