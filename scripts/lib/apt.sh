# Sourced by the scripts: `apt_install WHY PKG...` installs Debian packages a
# step needs, as root or through sudo, saying why.
apt_install() {
  local why=$1
  shift
  echo "==> installing $* ($why)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
