#!/bin/sh
# ipmi_sim chassis_control helper for the watchtower tests:
#   chassis_control.sh <mc> get power|boot ...   -> prints "power:1"
#   chassis_control.sh <mc> set power 0|1 ...    -> writes the state file
# The state lives in $WT_IPMI_CHASSIS_DIR (default: this script's directory), in power-<mc>, so a
# test can switch the "server" off by writing 0 there.
dir=${WT_IPMI_CHASSIS_DIR:-$(dirname "$0")}
mc=$1; shift; op=$1; shift
f="$dir/power-$mc"
[ -f "$f" ] || echo 1 > "$f"
case "$op" in
  get)
    for p in "$@"; do
      case "$p" in
        power) echo "power:$(cat "$f")" ;;
        boot)  echo "boot:default" ;;
        *) echo "Invalid parameter: $p"; exit 1 ;;
      esac
    done ;;
  set)
    while [ $# -gt 0 ]; do
      p=$1; v=$2; shift 2
      case "$p" in
        power) echo "$v" > "$f"; echo "$(date +%s) power=$v" >> "$dir/log" ;;
        reset|boot|shutdown) echo "$(date +%s) $p=$v" >> "$dir/log" ;;
        identify) shift; echo "$(date +%s) identify=$v" >> "$dir/log" ;;
        *) echo "Invalid parameter: $p"; exit 1 ;;
      esac
    done ;;
  check) exit 1 ;;
  *) echo "Unknown operation: $op"; exit 1 ;;
esac
exit 0
