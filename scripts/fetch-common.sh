# Shared by the fetch scripts (sourced, not run): size and sha256 checks of a downloaded
# file. The caller defines `log`.

file_size() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }

file_sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# verify_file PATH SIZE SHA256: 0 when PATH exists with that size and hash; says why not.
verify_file() {
    if [[ ! -f "$1" ]]; then
        log "not present: $1"
        return 1
    fi
    local size sum
    size="$(file_size "$1")"
    if [[ "$size" != "$2" ]]; then
        log "size mismatch for $1: got $size bytes, expected $2"
        return 1
    fi
    sum="$(file_sha256 "$1")"
    if [[ "$sum" != "$3" ]]; then
        log "sha256 mismatch for $1: got $sum, expected $3"
        return 1
    fi
    return 0
}
