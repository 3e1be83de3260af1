# Sourced by the scripts: installs what the build needs when it is missing:
# cmake (Pingora's libz-ng-sys), a C compiler (zstd-sys, ring, SQLite) and make
# (jemalloc).
. scripts/lib/apt.sh
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v make >/dev/null 2>&1 || need_apt+=(make)   # jemalloc's build
if [ ${#need_apt[@]} -gt 0 ]; then
  apt_install "needed to build Pingora" "${need_apt[@]}"
fi
