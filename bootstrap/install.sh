#!/usr/bin/env bash
# Scalarium node bootstrap, served to `curl ... | bash -s -- --token TOKEN ...`.
#
# Installs chef-solo when missing, downloads the agent, generates the node key locally (it never
# leaves the node), enrolls with a one-time token and starts the agent (systemd or foreground).
# Everything is inside main(), called on the last line, so a truncated download runs nothing.
# Never `set -x` here: the token is in this script's variables.
set -euo pipefail

# The server replaces this placeholder with its own URL when it serves the script.
SCALARIUM_URL_DEFAULT='@@SCALARIUM_URL@@'

die() {
    printf 'scalarium-install: error: %s\n' "$*" >&2
    exit 1
}

info() {
    printf 'scalarium-install: %s\n' "$*" >&2
}

usage() {
    cat >&2 <<'USAGE'
usage: install.sh --token TOKEN|--token-file FILE [--server URL] [--root DIR] [--foreground]
                  [--chef skip|cinc:VERSION|chef:VERSION|url:URL#sha256=HEX]
                  [--chef-binary PATH] [--ca FILE] [--agent-arg ARG]...
--token-file - reads the token from standard input (keeps it out of `ps`).
USAGE
}

require_tools() {
    local tool missing=()
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        die "missing required tool(s): ${missing[*]} (install them and run again)"
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' ||
        die "python3 3.8 or newer is required"
}

# Sets OS_ID, OS_VERSION and OS_FAMILY (debian|rhel|unknown) from /etc/os-release.
detect_os() {
    OS_ID=unknown OS_VERSION=unknown OS_FAMILY=unknown
    if [[ -r /etc/os-release ]]; then
        # shellcheck source=/dev/null
        OS_ID=$(. /etc/os-release && printf '%s' "${ID:-unknown}")
        # shellcheck source=/dev/null
        OS_VERSION=$(. /etc/os-release && printf '%s' "${VERSION_ID:-unknown}")
        local like
        # shellcheck source=/dev/null
        like=$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")
        case " $OS_ID $like " in
            *" debian "* | *" ubuntu "*) OS_FAMILY=debian ;;
            *" amzn "* | *" rhel "* | *" fedora "* | *" centos "*) OS_FAMILY=rhel ;;
        esac
    fi
    info "detected OS: $OS_ID $OS_VERSION ($OS_FAMILY family)"
}

find_chef_binary() {
    local candidate
    for candidate in cinc-solo /opt/cinc/bin/cinc-solo chef-solo /opt/chef/bin/chef-solo; do
        if command -v "$candidate" >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

install_chef() {
    local mode=$1 product version url sha tmp
    if [[ $mode == skip ]]; then
        info "chef installation skipped (--chef skip)"
        return 0
    fi
    if find_chef_binary >/dev/null; then
        info "chef-solo already installed: $(find_chef_binary)"
        return 0
    fi
    case $mode in
        cinc:* | chef:*)
            product=${mode%%:*} version=${mode#*:}
            local omnitruck=https://omnitruck.cinc.sh/install.sh
            [[ $product == chef ]] && omnitruck=https://omnitruck.chef.io/install.sh
            local args=(-P "$product")
            [[ -n $version && $version != latest ]] && args+=(-v "$version")
            info "installing $product ${version:-latest} from $omnitruck"
            curl -fsSL --retry 5 "$omnitruck" | bash -s -- "${args[@]}" ||
                die "installing $product failed"
            ;;
        url:*#sha256=*)
            url=${mode#url:} sha=${mode##*#sha256=}
            url=${url%#sha256=*}
            [[ $sha =~ ^[0-9a-fA-F]{64}$ ]] || die "--chef url: needs #sha256=<64 hex digits>"
            tmp=$(mktemp -d)
            local pkg=$tmp/${url##*/}
            curl -fsSL --retry 5 -o "$pkg" "$url" || die "cannot download $url"
            printf '%s  %s\n' "${sha,,}" "$pkg" | sha256sum -c --status ||
                die "checksum mismatch for $url"
            case $OS_FAMILY:$pkg in
                debian:*.deb) dpkg -i "$pkg" || die "dpkg -i failed" ;;
                rhel:*.rpm) rpm -Uvh "$pkg" || die "rpm -U failed" ;;
                *) die "cannot install ${pkg##*/} on $OS_ID ($OS_FAMILY family)" ;;
            esac
            rm -rf "$tmp"
            ;;
        *) die "unknown --chef mode '$mode' (skip, cinc:VERSION, chef:VERSION, url:URL#sha256=HEX)" ;;
    esac
    find_chef_binary >/dev/null || die "chef-solo/cinc-solo not found after installation"
}

write_unit() {
    # Keep this unit identical to bootstrap/scalarium-agent.service (a test compares them).
    local python=$1 opt_dir=$2 etc_dir=$3 unit_path=$4
    mkdir -p "$(dirname "$unit_path")"
    sed -e "s|/usr/bin/python3|$python|" -e "s|/opt/scalarium|$opt_dir|" \
        -e "s|/etc/scalarium|$etc_dir|" >"$unit_path" <<'UNIT'
[Unit]
Description=Scalarium node agent
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/bin/python3 /opt/scalarium/agent.py --config /etc/scalarium/agent.json
ExecReload=/bin/kill -HUP $MAINPID
Environment=PYTHONUNBUFFERED=1
# SIGTERM stops at once (a running chef-run is killed and reported failed); exit 0 means the
# server retired this instance, so only failures restart it.
KillMode=mixed
TimeoutStopSec=60
Restart=on-failure
RestartSec=10

[Install]
WantedBy=multi-user.target
UNIT
    chmod 0644 "$unit_path"
}

main() {
    local server="" token="" token_file="" root="/" foreground=0 chef_mode="cinc:latest"
    local chef_binary="" ca="" agent_args=()
    # Defaults from the environment, so that tests (and anyone trying it out) can run unchanged
    # user-data under a directory prefix and without systemd; the options still win.
    root=${SCALARIUM_ROOT:-$root}
    if [[ ${SCALARIUM_FOREGROUND:-} == 1 ]]; then
        foreground=1
    fi
    while (($#)); do
        case $1 in
            --server | --token | --token-file | --root | --chef | --chef-binary | --ca | --agent-arg)
                (($# >= 2)) || die "$1 needs a value"
                case $1 in
                    --server) server=$2 ;;
                    --token) token=$2 ;;
                    --token-file) token_file=$2 ;;
                    --root) root=$2 ;;
                    --chef) chef_mode=$2 ;;
                    --chef-binary) chef_binary=$2 ;;
                    --ca) ca=$2 ;;
                    --agent-arg) agent_args+=("$2") ;;
                esac
                shift 2
                ;;
            --foreground) foreground=1 && shift ;;
            -h | --help) usage && exit 0 ;;
            *) usage && die "unknown argument '$1'" ;;
        esac
    done

    # Split so that the server's substitution cannot rewrite this comparison too.
    local placeholder='@@SCALARIUM''_URL@@'
    if [[ -z $server && $SCALARIUM_URL_DEFAULT != "$placeholder" ]]; then
        server=$SCALARIUM_URL_DEFAULT
    fi
    [[ -n $server ]] || die "--server URL is required"
    if [[ -n $token_file ]]; then
        [[ -z $token ]] || die "give --token or --token-file, not both"
        # A file (or stdin) keeps the token out of the process list that `ps` shows everyone.
        if [[ $token_file == - ]]; then
            IFS= read -r token || true
        else
            [[ -r $token_file ]] || die "token file $token_file not readable"
            IFS= read -r token <"$token_file" || true
        fi
    fi
    [[ -n $token ]] || die "--token (or --token-file) is required"
    server=${server%/}
    case $server in
        https://*) ;;
        http://127.0.0.1:* | http://127.0.0.1 | http://localhost:* | http://localhost | http://\[::1\]*) ;;
        *) die "--server must be an https:// URL (plain http only on loopback)" ;;
    esac
    [[ $root != *[\|\&\\]* ]] || die "--root must not contain '|', '&' or '\\'"
    [[ -d $root ]] || die "--root $root is not a directory"
    root=$(cd "$root" && pwd)
    local prefix=${root%/}
    local etc_dir=$prefix/etc/scalarium state_dir=$prefix/var/lib/scalarium
    local opt_dir=$prefix/opt/scalarium
    ca=${ca:-$etc_dir/ca.pem}
    [[ -r $ca ]] || die "CA certificate $ca not readable (the user-data writes it)"

    require_tools bash curl openssl python3
    detect_os
    install_chef "$chef_mode"
    # An explicit --chef-binary beats the server's setting; the detected one only fills a gap.
    local detected_chef
    detected_chef=$(find_chef_binary) || detected_chef=chef-solo
    local chef_args=(--default-chef-binary "$detected_chef")
    [[ -n $chef_binary ]] && chef_args+=(--chef-binary "$chef_binary")

    umask 077
    mkdir -p "$etc_dir" "$state_dir" "$opt_dir"
    local agent=$opt_dir/agent.py python
    python=$(command -v python3)
    info "downloading the agent from $server"
    curl -fsS --retry 5 --cacert "$ca" -o "$agent.new" "$server/bootstrap/v1/agent.py" ||
        die "cannot download the agent from $server/bootstrap/v1/agent.py"
    "$python" "$agent.new" --version >/dev/null || die "the downloaded agent does not run"
    chmod 0755 "$agent.new"
    mv -f "$agent.new" "$agent"

    local config=$etc_dir/agent.json key=$etc_dir/agent-key.pem
    if "$python" "$agent" --config "$config" check-enrollment --server "$server"; then
        info "already enrolled with $server; not enrolling again"
    else
        info "generating the node key (RSA 2048)"
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$key.new" 2>/dev/null ||
            die "openssl could not generate a key"
        chmod 0600 "$key.new"
        mv -f "$key.new" "$key"
        info "enrolling with $server"
        printf '%s\n' "$token" | "$python" "$agent" --config "$config" enroll \
            --server "$server" --root "$root" --ca "$ca" "${chef_args[@]}" ||
            die "enrollment failed (see the error above)"
    fi

    if [[ ${SCALARIUM_AGENT_ONCE:-} == 1 ]]; then
        agent_args+=(--once)
    fi
    if ((foreground)); then
        info "starting the agent in the foreground"
        exec "$python" "$agent" --config "$config" "${agent_args[@]}" </dev/null
    fi
    local unit=$prefix/etc/systemd/system/scalarium-agent.service
    write_unit "$python" "$opt_dir" "$etc_dir" "$unit"
    if [[ $prefix == "" ]] && command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        systemctl enable scalarium-agent.service >/dev/null 2>&1
        systemctl restart scalarium-agent.service
        info "agent started (systemctl status scalarium-agent)"
    else
        info "unit written to $unit; start it with systemd or rerun with --foreground"
    fi
}

main "$@"
