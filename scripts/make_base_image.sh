#!/usr/bin/env bash
# Make a local Debian bookworm base image (with python3 + venv) for the CPU image of chatglm-serve,
# for machines that cannot pull from an image registry.
#
#   scripts/make_base_image.sh [IMAGE_NAME]        (default: chatglm-serve-base:bookworm)
#   scripts/make_base_image.sh --print-mirror      (only print the mirror it would use)
#
# The Debian mirror is the one apt on this host already uses, read from /etc/apt/sources.list.d/
# (or /etc/apt/sources.list) at run time, or given as DEBIAN_MIRROR=URL. It is never written into
# the image: the image's apt sources point at the public deb.debian.org. The root filesystem is
# built under a temporary directory (WORK_DIR, default /tmp) and removed afterwards.
set -euo pipefail

IMAGE=${1:-chatglm-serve-base:bookworm}
SUITE=${SUITE:-bookworm}
WORK_DIR=${WORK_DIR:-/tmp}
APT_ETC=${APT_ETC:-/etc/apt}
# python3-venv brings ensurepip, so the Dockerfile can make a virtual environment without apt.
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}

die() { echo "make_base_image: $*" >&2; exit 1; }

# Print the first URI of a Debian (not -security, not -updates) repository serving $SUITE.
apt_mirror() {
    local f
    shopt -s nullglob
    for f in "$APT_ETC"/sources.list.d/*.sources; do
        # deb822 stanzas are separated by blank lines; pick one whose Types has deb and Suites has
        # exactly $SUITE.
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""
            }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            /^Types:/  { sub(/^Types:[[:space:]]*/, "");  types = $0 }
            /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
            /^URIs:/   { sub(/^URIs:[[:space:]]*/, "");   uris = $0 }
            END { if (!found) flush() }
        ' "$f" | head -n1 | grep . && return 0
    done
    for f in "$APT_ETC"/sources.list.d/*.list "$APT_ETC"/sources.list; do
        [[ -f $f ]] || continue
        # one-line style: deb [options] URI SUITE COMPONENTS...
        sed -E 's/\[[^]]*\]//' "$f" |
            awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' | grep . && return 0
    done
    return 1
}

if [[ $IMAGE == --print-mirror ]]; then # what would be used, and nothing else
    apt_mirror || die "no Debian mirror for $SUITE found in $APT_ETC"
    exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
command -v docker >/dev/null || die "docker is not installed"

MIRROR=${DEBIAN_MIRROR:-$(apt_mirror || true)}
[[ -n $MIRROR ]] || die "no Debian mirror for $SUITE found in $APT_ETC; set DEBIAN_MIRROR"

ROOTFS=$(mktemp -d "$WORK_DIR/chatglm-rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$ROOTFS"' EXIT

start=$(date +%s)
echo "make_base_image: debootstrap $SUITE ($PACKAGES) from the host's apt mirror into $ROOTFS"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 ||
    { tail -n 30 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; die "debootstrap failed"; }
rm -f "$ROOTFS.log"

# Keep the host's mirror out of the image; leave the public one so `apt-get` still works inside.
rm -f "$ROOTFS/etc/apt/sources.list" "$ROOTFS"/etc/apt/sources.list.d/*
cat >"$ROOTFS/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log \
    "$ROOTFS"/tmp/* "$ROOTFS"/root/.cache

tar --numeric-owner -C "$ROOTFS" -c . |
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "make_base_image: $IMAGE made in $(($(date +%s) - start)) s"
