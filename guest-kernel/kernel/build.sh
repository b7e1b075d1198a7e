#!/usr/bin/env bash
# Build the hpcvm guest kernel: Debian's linux-source-6.12 + patches/ + a
# tinyconfig-based config (config.fragment), as an ELF vmlinux with a PVH note.
#
#   build.sh [--flavor F]               build (or reuse) the kernel; the LAST line
#                                       of stdout is the path of the vmlinux
#   build.sh [--flavor F] --print-path  print the path the kernel has (or would
#                                       have) and build nothing
#
# --flavor F also merges config.F.fragment after config.fragment (`ib`: mlx5 and
# InfiniBand, for VFIO passthrough of ConnectX HCAs and VFs).
#
# The result is cached at ${HPCVM_CACHE:-$HOME/.cache/hpcvm}/kernel-<hash>/vmlinux
# (with its .config and System.map beside it), where <hash> is the sha256 of
# the fragments, the patches, this script and the linux-source-6.12 package
# version.  When that file exists the script only prints its path.
#
# The source tree and objects live in ${HPCVM_KERNEL_WORK:-/var/tmp/hpcvm-kernel}
# (outside the repository; about 2 GiB), kept so a config change rebuilds only
# what it affects.  Delete that directory to reclaim the space.
#
# On a fresh Debian machine run it as root: it installs what is missing with
# apt-get.  Everything but the final path goes to stderr.
set -euo pipefail
export LC_ALL=C

exec 3>&1 1>&2          # stdout is reserved for the final path (fd 3)

PKG=linux-source-6.12
TARBALL=/usr/src/linux-source-6.12.tar.xz
DEPS=("$PKG" build-essential bc bison flex libelf-dev libssl-dev cpio)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT=$HERE/config.fragment
CACHE=${HPCVM_CACHE:-$HOME/.cache/hpcvm}
WORK=${HPCVM_KERNEL_WORK:-/var/tmp/hpcvm-kernel}

die() { echo "build.sh: error: $*"; exit 1; }
log() { echo "build.sh: $*"; }

usage="usage: build.sh [--flavor F] [--print-path]"
print_path=0
flavor=
while [ $# -gt 0 ]; do
    case "$1" in
        --print-path) print_path=1 ;;
        --flavor)
            [ $# -ge 2 ] || die "--flavor needs a name ($usage)"
            flavor=$2
            shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&3; exit 0 ;;
        *) die "unknown argument '$1' ($usage)" ;;
    esac
    shift
done
FRAGMENTS=("$FRAGMENT")
if [ -n "$flavor" ]; then
    case "$flavor" in
        *[!a-z0-9_-]*) die "bad flavor name '$flavor' (letters, digits, - and _)" ;;
    esac
    [ -f "$HERE/config.$flavor.fragment" ] || die "no flavor '$flavor': $HERE/config.$flavor.fragment does not exist"
    FRAGMENTS+=("$HERE/config.$flavor.fragment")
fi

shopt -s nullglob
PATCHES=("$HERE"/patches/*.patch)
shopt -u nullglob

installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

# Version of the kernel source: the installed package, else (only to print the
# path before anything is installed) the version apt would install.
source_version() {
    if installed "$PKG"; then
        dpkg-query -W -f='${Version}' "$PKG"
    else
        apt-cache policy "$PKG" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
    fi
}

kernel_hash() {
    local version=$1 f
    {
        printf '%s %s\n' "$PKG" "$version"
        for f in "${FRAGMENTS[@]}" "$HERE/build.sh" "${PATCHES[@]}"; do
            printf '%s %s\n' "${f#"$HERE"/}" "$(sha256sum <"$f" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -d' ' -f1
}

version=$(source_version)
[ -n "$version" ] || die "package $PKG is neither installed nor available from apt (Debian 12 has it in bookworm-security, Debian 13 in main)"
out_dir=$CACHE/kernel-$(kernel_hash "$version")
vmlinux=$out_dir/vmlinux

if [ "$print_path" = 1 ] || [ -f "$vmlinux" ]; then
    [ "$print_path" = 1 ] || log "cached: $vmlinux"
    echo "$vmlinux" >&3
    exit 0
fi

# ---- Build dependencies ---------------------------------------------------------
[ "$(uname -m)" = x86_64 ] || die "builds only on x86_64 hosts (this is $(uname -m))"
missing=()
for p in "${DEPS[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; run as root or: apt-get install ${missing[*]}"
    log "installing ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    version=$(source_version)
    out_dir=$CACHE/kernel-$(kernel_hash "$version")
    vmlinux=$out_dir/vmlinux
fi
[ -f "$TARBALL" ] || die "$TARBALL is missing although $PKG is installed (try: apt-get install --reinstall $PKG)"

# The work dir must not be inside this repository (it is ~2 GiB of build output).
repo=$(git -C "$HERE" rev-parse --show-toplevel 2>/dev/null || echo "$HERE")
case "$(realpath -m "$WORK")/" in
    "$(realpath -m "$repo")"/*) die "HPCVM_KERNEL_WORK=$WORK is inside the repository $repo; use a directory outside it" ;;
esac
mkdir -p "$WORK" "$CACHE"

# One build at a time per work dir (it holds the source trees, and a build takes
# every core): a second build.sh waits, then usually finds the cache filled.
exec 9>"$WORK/.build.lock"
if ! flock -n 9; then
    log "another build.sh holds $WORK/.build.lock; waiting"
    flock 9
fi
if [ -f "$vmlinux" ]; then
    log "cached (built meanwhile): $vmlinux"
    echo "$vmlinux" >&3
    exit 0
fi

# ---- Source tree: unpacked once per (package version, patches) ------------------
src_key=$({
    printf '%s %s\n' "$PKG" "$version"
    for f in "${PATCHES[@]}"; do printf '%s %s\n' "${f##*/}" "$(sha256sum <"$f" | cut -d' ' -f1)"; done
} | sha256sum | cut -c1-16)
src=$WORK/src-$src_key
# One object tree per flavour, so switching between them rebuilds nothing twice.
build=$src/build${flavor:+-$flavor}
if [ ! -f "$src/.hpcvm-source-ready" ]; then
    for old in "$WORK"/src-*; do
        [ -e "$old" ] || continue
        log "removing stale source tree $old"
        rm -rf "$old"
    done
    log "unpacking $TARBALL ($PKG $version) into $src"
    rm -rf "$src.tmp"
    mkdir -p "$src.tmp"
    tar -xf "$TARBALL" -C "$src.tmp" --strip-components=1
    for p in "${PATCHES[@]}"; do
        log "applying ${p##*/}"
        patch -d "$src.tmp" -p1 --forward --batch --quiet <"$p" || die "patch ${p##*/} does not apply to $PKG $version"
    done
    touch "$src.tmp/.hpcvm-source-ready"
    mv "$src.tmp" "$src"
fi

# ---- Configuration: tinyconfig + fragment + olddefconfig ------------------------
export KBUILD_BUILD_USER=hpcvm KBUILD_BUILD_HOST=hpcvm
kmake() { make -C "$src" O="$build" ARCH=x86_64 "$@"; }
mkdir -p "$build"
log "configuring: tinyconfig + ${FRAGMENTS[*]##*/} + olddefconfig"
kmake -s tinyconfig
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "${FRAGMENTS[@]}" >/dev/null
kmake -s olddefconfig

# Every setting of the fragments must have survived olddefconfig (an option whose
# dependencies are off is dropped silently by Kconfig); a later fragment's setting
# of a symbol replaces an earlier one's.
declare -A want=()
for f in "${FRAGMENTS[@]}"; do
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) want[${line%%=*}]=$line ;;
            "# CONFIG_"*" is not set") sym=${line#\# }; want[${sym%% *}]=$line ;;
        esac
    done <"$f"
done
bad=()
for sym in "${!want[@]}"; do
    line=${want[$sym]}
    case "$line" in
        CONFIG_*=*)
            grep -qxF -- "$line" "$build/.config" || bad+=("$line (got: $(grep -E "^(# )?$sym[= ]" "$build/.config" || echo absent))") ;;
        *)
            ! grep -qE "^$sym=" "$build/.config" || bad+=("$line (got: $(grep -E "^$sym=" "$build/.config"))") ;;
    esac
done
if [ ${#bad[@]} -gt 0 ]; then
    echo "build.sh: error: these settings of ${FRAGMENTS[*]##*/} did not survive 'make olddefconfig'"
    echo "(a dependency is missing or something selects them):"
    printf '  %s\n' "${bad[@]}"
    exit 1
fi

# ---- Build ------------------------------------------------------------------------
jobs=$(nproc)
log "building vmlinux with make -j$jobs in $build"
start=$(date +%s)
kmake -j"$jobs" vmlinux
log "built in $(( $(date +%s) - start )) s"

tmp_out=$out_dir.tmp.$$
rm -rf "$tmp_out" "$out_dir"
mkdir -p "$tmp_out"
cp "$build/vmlinux" "$tmp_out/vmlinux.tmp"
cp "$build/.config" "$tmp_out/config"
cp "$build/System.map" "$tmp_out/System.map"
printf '%s %s\n' "$PKG" "$version" >"$tmp_out/source-version"
mv "$tmp_out/vmlinux.tmp" "$tmp_out/vmlinux"
mv -T "$tmp_out" "$out_dir"
log "vmlinux: $(stat -c %s "$vmlinux") bytes"
echo "$vmlinux" >&3
