#!/usr/bin/env bash
# Submit the nightly oodlib job to a running Ray cluster and wait until it is finished.
#
#   cluster/nightly.sh [CONFIG]          # CONFIG defaults to $CONFIG, else configs/digits.yaml
#
# It runs, from the project directory (the parent of cluster/, or $OODLIB_WORKDIR):
#   oodlib submit --no-wait --submission-id nightly-YYYY-MM-DD --working-dir . \
#       --config "$CONFIG" --schedule nightly
# (`oodlib submit` pins the output directory and the MLflow tracking URI on this side and records the
# git sha, so every night writes into the same tables and store), then polls `ray job status` until the
# job is terminal, prints the tail of the job logs, and exits
#   0  SUCCEEDED        1  FAILED          2  STOPPED (someone ran `ray job stop`)
#   3  poll timeout (the job is stopped unless STOP_ON_TIMEOUT=0)
#   4  cannot submit / cannot reach the cluster      64  bad usage or settings (or a bad config: exit 2 of oodlib)
# `ray job submit` alone is not enough for a scheduler: it exits 0 for a STOPPED job.
#
# The dated submission id is an idempotency key (Ray rejects a reused id): if a job with that id
# already exists (a retried cron/CronJob run the same day), this script does not submit again, it
# watches the existing job and reports its outcome.
#
# Environment (all optional):
#   RAY_ADDRESS        Jobs API address            (default http://127.0.0.1:8265; via the
#                      `ray dashboard` SSH tunnel or `kubectl port-forward`, never a public address)
#   SUBMISSION_ID      submission id               (default nightly-$(date -u +%Y-%m-%d))
#   CONFIG             job config, relative to the project directory (default configs/digits.yaml)
#   OODLIB_WORKDIR     project directory uploaded as the job's working_dir (default: repo root)
#   POLL_INTERVAL_S    seconds between status polls (default 30)
#   POLL_TIMEOUT_S     give up after this many seconds of polling (default 21600 = 6 h)
#   STOP_ON_TIMEOUT    1: `ray job stop` the job on timeout (default 1)
#   MAX_STATUS_ERRORS  consecutive failed `ray job status` calls tolerated (default 10)
#   SUBMIT_ATTEMPTS    `oodlib submit` attempts before giving up (default 3)
#   SUBMIT_RETRY_DELAY_S  seconds between submit attempts (default 30)
#   LOG_TAIL_LINES     lines of job logs printed at the end (default 200)
#   OODLIB_BIN         the oodlib command (default oodlib, from the project's venv)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the cluster token (default file ~/.ray/auth_token)
# RAY_AUTH_MODE=token is always exported: the cluster runs with token auth.
set -uo pipefail

log() { printf '[nightly %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

# Reads the output of `ray job status` on stdin and prints one of
# PENDING RUNNING STOPPED SUCCEEDED FAILED UNKNOWN.
# Ray 2.60 prints "Job '<id>' succeeded" / "Job '<id>' was stopped" / "Job '<id>' failed" for
# terminal states and "Status for job '<id>': <STATUS>" otherwise (record or pretty log style).
parse_status() {
    local out s
    out="$(sed -E $'s/\x1b\\[[0-9;]*[A-Za-z]//g')"
    if grep -Eq "Job '[^']*' succeeded" <<<"$out"; then
        echo SUCCEEDED
    elif grep -Eq "Job '[^']*' was stopped" <<<"$out"; then
        echo STOPPED
    elif grep -Eq "Job '[^']*' failed" <<<"$out"; then
        echo FAILED
    else
        s="$(grep -Eo "Status for job '[^']*': [A-Z]+" <<<"$out" | tail -n 1 | grep -Eo '[A-Z]+$')"
        echo "${s:-UNKNOWN}"
    fi
}

_is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
_is_number() { [[ "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; }

print_logs_tail() {
    log "last ${LOG_TAIL_LINES} lines of the logs of ${SUBMISSION_ID}:"
    echo "----------------------------------------------------------------------"
    "$RAY_BIN" job logs --address "$RAY_ADDRESS" "$SUBMISSION_ID" 2>&1 | tail -n "$LOG_TAIL_LINES"
    echo "----------------------------------------------------------------------"
}

main() {
    local script_dir
    script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

    CONFIG="${1:-${CONFIG:-configs/digits.yaml}}"
    WORKDIR="${OODLIB_WORKDIR:-$(dirname "$script_dir")}"
    export RAY_AUTH_MODE=token
    export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
    SUBMISSION_ID="${SUBMISSION_ID:-nightly-$(date -u +%Y-%m-%d)}"
    POLL_INTERVAL_S="${POLL_INTERVAL_S:-30}"
    POLL_TIMEOUT_S="${POLL_TIMEOUT_S:-21600}"
    STOP_ON_TIMEOUT="${STOP_ON_TIMEOUT:-1}"
    MAX_STATUS_ERRORS="${MAX_STATUS_ERRORS:-10}"
    LOG_TAIL_LINES="${LOG_TAIL_LINES:-200}"
    SUBMIT_ATTEMPTS="${SUBMIT_ATTEMPTS:-3}"
    SUBMIT_RETRY_DELAY_S="${SUBMIT_RETRY_DELAY_S:-30}"
    RAY_BIN="${RAY_BIN:-ray}"
    OODLIB_BIN="${OODLIB_BIN:-oodlib}"

    # --- settings check: fail before touching the cluster ---
    if [[ ! "$SUBMISSION_ID" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
        log "invalid SUBMISSION_ID '$SUBMISSION_ID' (letters, digits, . _ - only)"; return 64
    fi
    local name
    for name in POLL_TIMEOUT_S MAX_STATUS_ERRORS LOG_TAIL_LINES SUBMIT_ATTEMPTS; do
        _is_uint "${!name}" || { log "$name must be a non-negative integer, got '${!name}'"; return 64; }
    done
    for name in POLL_INTERVAL_S SUBMIT_RETRY_DELAY_S; do
        _is_number "${!name}" || { log "$name must be a number, got '${!name}'"; return 64; }
    done
    ((SUBMIT_ATTEMPTS >= 1)) || { log "SUBMIT_ATTEMPTS must be >= 1"; return 64; }
    cd "$WORKDIR" 2>/dev/null || { log "project directory not found: $WORKDIR"; return 64; }
    [[ -f "$CONFIG" ]] || { log "config not found: $WORKDIR/$CONFIG"; return 64; }
    command -v "$RAY_BIN" >/dev/null 2>&1 || { log "'$RAY_BIN' not found on PATH"; return 4; }
    command -v "$OODLIB_BIN" >/dev/null 2>&1 || { log "'$OODLIB_BIN' not found on PATH (activate the project's venv)"; return 4; }

    log "cluster $RAY_ADDRESS, submission id $SUBMISSION_ID, config $CONFIG, working dir $WORKDIR"

    # --- submit (unless this id already exists: re-attach instead of a duplicate submission) ---
    # A submission can fail transiently (e.g. "No available agent to submit job" right after the
    # cluster starts): retry, checking before each attempt whether the job was created after all.
    local out rc status attempt=1
    while :; do
        if out="$("$RAY_BIN" job status --address "$RAY_ADDRESS" "$SUBMISSION_ID" 2>&1)"; then
            log "job $SUBMISSION_ID exists (status $(parse_status <<<"$out")): watching it, not resubmitting"
            break
        fi
        "$OODLIB_BIN" submit --address "$RAY_ADDRESS" --no-wait --attempts 1 \
            --submission-id "$SUBMISSION_ID" --working-dir . --config "$CONFIG" --schedule nightly
        rc=$?
        ((rc == 0)) && break
        ((rc == 2)) && { log "the config $CONFIG is invalid (oodlib submit exit 2): not retrying"; return 64; }
        if ((attempt >= SUBMIT_ATTEMPTS)); then
            log "oodlib submit failed (exit $rc) $attempt time(s): cluster unreachable, bad token, or id in use"
            return 4
        fi
        log "oodlib submit failed (exit $rc); retry $attempt/$((SUBMIT_ATTEMPTS - 1)) in ${SUBMIT_RETRY_DELAY_S}s"
        attempt=$((attempt + 1))
        sleep "$SUBMIT_RETRY_DELAY_S"
    done

    # --- poll until terminal ---
    local errors=0 last="" start=$SECONDS
    while :; do
        if out="$("$RAY_BIN" job status --address "$RAY_ADDRESS" "$SUBMISSION_ID" 2>&1)"; then
            errors=0
            status="$(parse_status <<<"$out")"
            if [[ "$status" != "$last" ]]; then
                log "status: $status"
                last="$status"
            fi
            case "$status" in
                SUCCEEDED | FAILED | STOPPED) break ;;
            esac
        else
            errors=$((errors + 1))
            log "ray job status failed ($errors/$MAX_STATUS_ERRORS): $(tail -n 1 <<<"$out")"
            if ((errors >= MAX_STATUS_ERRORS)); then
                log "giving up: cannot get the status of $SUBMISSION_ID (the job may still be running)"
                return 4
            fi
        fi
        if ((SECONDS - start >= POLL_TIMEOUT_S)); then
            log "timeout: $SUBMISSION_ID not finished after ${POLL_TIMEOUT_S}s (last status ${last:-unknown})"
            print_logs_tail
            if [[ "$STOP_ON_TIMEOUT" == 1 ]]; then
                log "stopping $SUBMISSION_ID"
                "$RAY_BIN" job stop --address "$RAY_ADDRESS" --no-wait "$SUBMISSION_ID" \
                    || log "ray job stop failed; stop it by hand"
            fi
            return 3
        fi
        sleep "$POLL_INTERVAL_S"
    done

    print_logs_tail
    case "$status" in
        SUCCEEDED) log "$SUBMISSION_ID SUCCEEDED"; return 0 ;;
        FAILED) log "$SUBMISSION_ID FAILED"; return 1 ;;
        *) log "$SUBMISSION_ID was STOPPED before finishing"; return 2 ;;
    esac
}

# `source cluster/nightly.sh` only defines the functions (tests use parse_status).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    main "$@"
    exit $?
fi
