#!/usr/bin/env bash
# The README's install recipe, run verbatim on this machine (Debian 12, root), then the daemon
# started the way systemd/watchtower.service starts it, and every command the alert texts name run
# from a root shell. Removes everything it installed at the end. Run by .ci/run.
#
# Without systemd as PID 1 (CI containers) the unit's sandbox is rebuilt by hand: a throwaway uid
# stands in for DynamicUser= (setpriv), the LoadCredential= files are copied to a credentials
# directory owned by it ($CREDENTIALS_DIRECTORY), and in a mount namespace of its own the state
# directory is /var/lib/private/watchtower behind the link /var/lib/watchtower (StateDirectory=),
# /home and /root are hidden (ProtectHome=), /tmp is private (PrivateTmp=) and / is read-only
# (ProtectSystem=strict); UMask=0077; ExecStartPre=/ExecStart= are taken from the unit file itself.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
UNIT=systemd/watchtower.service

if [[ $(id -u) != 0 ]]; then
  echo "test-install: needs root (it installs into /opt, /etc and /usr/local)" >&2
  exit 2
fi
INSTALLED=(/opt/watchtower /usr/local/bin/watchtower /etc/watchtower /etc/systemd/system/watchtower.service
           /var/lib/watchtower /var/lib/private/watchtower)
for path in "${INSTALLED[@]}"; do
  if [[ -e $path || -L $path ]]; then
    echo "test-install: $path exists already; this test only runs where watchtower is not installed" >&2
    exit 2
  fi
done

WORK=$(mktemp -d /tmp/wt-install.XXXXXX)
[[ -e build ]] || MADE_BUILD=1  # pip install . leaves setuptools' build/ in the checkout
CREDS=/run/credentials/watchtower.service
PIDS=()
cleanup() {
  local code=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "${INSTALLED[@]}" "$CREDS" "$WORK"
  rmdir /run/credentials 2>/dev/null || true
  [[ -n ${MADE_PRIVATE:-} ]] && rmdir /var/lib/private 2>/dev/null || true
  [[ -n ${MADE_BUILD:-} ]] && rm -rf "$REPO/build" || true
  if ((code)); then echo "test-install: FAILED" >&2; else echo "test-install: ok" >&2; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*" >&2; }
fail() { echo "test-install: $*" >&2; [[ -f $WORK/daemon.log ]] && tail -40 "$WORK/daemon.log" >&2; exit 1; }
http() {  # http URL [TOKEN] -> body on stdout, exit 1 on an error status
  /usr/bin/python3 - "$@" <<'EOF'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", f"Bearer {sys.argv[2]}")
try:
    sys.stdout.write(urllib.request.urlopen(req, timeout=5).read().decode())
except Exception as exc:
    sys.exit(f"{sys.argv[1]}: {exc}")
EOF
}
wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out waiting for $what"
    sleep 0.2
  done
}
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "the README's recipe, verbatim"
awk '/<!-- install:begin -->/{on=1; next} /<!-- install:end -->/{on=0} on && !/^```/' README.md >"$WORK/recipe.sh"
[[ -s $WORK/recipe.sh ]] || fail "no install recipe between the markers in README.md"
cat "$WORK/recipe.sh" >&2
(cd "$REPO" && bash -euxo pipefail "$WORK/recipe.sh")
[[ -x /usr/local/bin/watchtower ]] || fail "/usr/local/bin/watchtower missing after the recipe"
[[ $(readlink -f /opt/watchtower/bin/python) == /usr/bin/python3* ]] || fail "the venv does not use Debian's Python"

step "a site config and its secrets, as an admin would write them"
SMTP_PORT=$(free_port) LISTEN_PORT=$(free_port) UP_PORT=$(free_port) DOWN_PORT=$(free_port)
"$REPO/.venv/bin/python" -m aiosmtpd -n -l "127.0.0.1:$SMTP_PORT" >"$WORK/smtp.log" 2>&1 &  # prints each mail
PIDS+=($!)
/usr/bin/python3 -m http.server "$UP_PORT" --bind 127.0.0.1 --directory "$WORK" >/dev/null 2>&1 &
PIDS+=($!)
site_config() {  # site_config [EXTRA TARGET YAML]
  cat <<EOF
site: ci-install
listen: 127.0.0.1:$LISTEN_PORT
api_token_file: api-token
defaults: {interval: 1s, retry_interval: 200ms, timeout: 500ms}
targets:
  web1:
    role: service
    paths:
      - tcp: 127.0.0.1:$UP_PORT
      - http: {url: "http://127.0.0.1:$UP_PORT/", interval: 5s}
  erp1:
    role: service
    service: {name: ERP, rto: 4h}
    paths:
      - tcp: 127.0.0.1:$DOWN_PORT
${1:-}
notify:
  channels:
    - {name: mail-oncall, url_file: mail-url, tags: [tier1]}
  escalation:
    - {after: 0s, notify: [tier1]}
EOF
}
site_config >/etc/watchtower/watchtower.yaml
TOKEN=$(openssl rand -hex 24)
(
  umask 077
  echo "$TOKEN" >/etc/watchtower/credentials/api-token
  echo "mailto://127.0.0.1:$SMTP_PORT?from=watchtower@ci.test&to=oncall@ci.test" >/etc/watchtower/credentials/mail-url
  # the other files the shipped unit loads (the example config's); this config does not use them
  for name in snmp-community bmc-pve1 bmc-pve2 signal-url sms-url mail-md-url heartbeat-url; do
    echo unused >"/etc/watchtower/credentials/$name"
  done
)

step "watchtower check, from a root shell, nothing exported"
env -u CREDENTIALS_DIRECTORY -u WATCHTOWER_CONFIG watchtower check | tee "$WORK/check.out"
grep -q '^ok: 2 targets, 3 paths$' "$WORK/check.out" || fail "check did not say ok"

step "the daemon as the unit starts it"
SERVICE_UID=$(/usr/bin/python3 -c 'import pwd, random
while True:
    uid = random.randint(61184, 65519)  # systemd'"'"'s range for dynamic users
    try: pwd.getpwuid(uid)
    except KeyError: print(uid); break')
unit_value() { sed -n "s/^$1=//p" "$UNIT"; }
CONFIG=$(unit_value Environment | sed -n 's/^WATCHTOWER_CONFIG=//p')
[[ $CONFIG == /etc/watchtower/watchtower.yaml ]] || fail "unexpected WATCHTOWER_CONFIG in the unit: $CONFIG"
expand() { local line=$1; echo "${line//\$\{WATCHTOWER_CONFIG\}/$CONFIG}"; }
read -r -a PRE <<<"$(expand "$(unit_value ExecStartPre)")"
read -r -a START <<<"$(expand "$(unit_value ExecStart)")"
# LoadCredential=: every file must exist (systemd refuses to start the unit otherwise)
mkdir -p /run/credentials && chmod 0755 /run/credentials
install -d -m 0700 -o "$SERVICE_UID" -g "$SERVICE_UID" "$CREDS"
while IFS=: read -r id path; do
  [[ -f $path ]] || fail "LoadCredential=$id:$path: no such file (the unit would not start)"
  install -m 0400 -o "$SERVICE_UID" -g "$SERVICE_UID" "$path" "$CREDS/$id"
done < <(unit_value LoadCredential)
chmod 0500 "$CREDS"
# StateDirectory= with DynamicUser=: /var/lib/private/watchtower, owned by the service's uid, reached
# through the link /var/lib/watchtower (the config's state_dir). /var/lib/private stays 0700 root;
# inside the service's mount namespace systemd makes it passable, and so does as_service below.
[[ -d /var/lib/private ]] || { install -d -m 0700 /var/lib/private; MADE_PRIVATE=1; }
install -d -m 0700 -o "$SERVICE_UID" -g "$SERVICE_UID" /var/lib/private/watchtower
ln -s private/watchtower /var/lib/watchtower
export WT_MNT=$WORK/state-mnt
mkdir "$WT_MNT"
as_service() {  # exec: run in a subshell, whose PID becomes the service's
  exec unshare --mount --propagation private -- /bin/sh -euc '
    # StateDirectory=: the state directory through a passable /var/lib/private
    mount --bind /var/lib/private/watchtower "$WT_MNT"
    mount -t tmpfs -o mode=0755 tmpfs /var/lib/private
    mkdir /var/lib/private/watchtower
    mount --move "$WT_MNT" /var/lib/private/watchtower
    # ProtectHome=yes, PrivateTmp=yes, ProtectSystem=strict (/ read-only, the state directory not)
    mount -t tmpfs -o mode=0755 tmpfs /home
    mount -t tmpfs -o mode=0700 tmpfs /root
    mount -t tmpfs -o mode=1777 tmpfs /tmp
    mount -t tmpfs -o mode=1777 tmpfs /var/tmp
    mount -o remount,bind,ro /
    umask 0077
    exec "$@"' sh \
    env -i PATH=/usr/local/bin:/usr/bin:/bin CREDENTIALS_DIRECTORY="$CREDS" WATCHTOWER_CONFIG="$CONFIG" \
    setpriv --reuid="$SERVICE_UID" --regid="$SERVICE_UID" --clear-groups --no-new-privs -- "$@"
}
(as_service "${PRE[@]}") || fail "ExecStartPre (${PRE[*]}) failed as the service user"
(as_service "${START[@]}") >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
PIDS+=("$DAEMON")
BASE=http://127.0.0.1:$LISTEN_PORT
wait_until 30 "/healthz" http "$BASE/healthz"
ps -o user:12,pid,args -p "$DAEMON" >&2
[[ $(stat -c %u /proc/"$DAEMON") == "$SERVICE_UID" ]] || fail "the daemon does not run as uid $SERVICE_UID"
http "$BASE/api/v1/state" >/dev/null 2>&1 && fail "the API answered without the token"

step "erp1 is down: one incident, one page"
has_incident() { http "$BASE/api/v1/incidents" "$TOKEN" | grep -q '"root": "erp1"'; }
wait_until 30 "the erp1 incident" has_incident
page() { grep -q "MESSAGE FOLLOWS" "$WORK/smtp.log"; }
wait_until 30 "the page at the SMTP sink" page
ID=$(http "$BASE/api/v1/incidents" "$TOKEN" | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')

step "the commands of the alert texts, from a root shell, nothing exported"
cli() { env -u CREDENTIALS_DIRECTORY -u WATCHTOWER_CONFIG watchtower "$@"; }
cli status | tee "$WORK/status.out"
grep -q "down .*erp1" "$WORK/status.out" || fail "status does not show erp1 down"
cli incidents | grep -q "#$ID" || fail "incidents does not list #$ID"
cli ack "$ID" --by ci | grep -q "acknowledged by ci" || fail "ack failed"
cli report "$ID" | grep -q "acknowledged by ci" || fail "report does not show the ack"
cli mute web1 --for 10m --reason "install test" --by ci | grep -q "web1 muted until" || fail "mute failed"
http "$BASE/metrics" | grep -q '^watchtower_muted{target="web1"} 1.0$' || fail "watchtower_muted not 1"
cli unmute web1 --by ci | grep -q "ended by ci" || fail "unmute failed"
cli notify-test | tee "$WORK/notify.out"
grep -q "mail-oncall  ok" "$WORK/notify.out" || fail "notify-test did not deliver"
test_mail() { (($(grep -c "MESSAGE FOLLOWS" "$WORK/smtp.log") >= 2)); }
wait_until 15 "the test mail" test_mail

step "systemctl reload: SIGHUP re-reads the config"
site_config "  web2: {role: service, paths: [{tcp: 127.0.0.1:$UP_PORT}]}" >/etc/watchtower/watchtower.yaml
cli check | grep -q '^ok: 3 targets' || fail "the changed config does not check"
kill -HUP "$DAEMON"
has_web2() { http "$BASE/api/v1/state" "$TOKEN" | grep -q '"web2"'; }
wait_until 30 "web2 after the reload" has_web2
grep -q "config reloaded" "$WORK/daemon.log" || fail "no reload in the log"

step "systemctl stop: SIGTERM"
kill -TERM "$DAEMON"
wait "$DAEMON" || fail "the daemon did not stop cleanly"
PIDS=("${PIDS[@]/$DAEMON}")
[[ -s /var/lib/private/watchtower/watchtower.sqlite ]] || fail "no store in the state directory"
[[ $(stat -c %u /var/lib/private/watchtower/watchtower.sqlite) == "$SERVICE_UID" ]] || fail "store not the service's"
cli incidents --all | grep -q "#$ID" || fail "incidents from the store (daemon stopped) does not list #$ID"
