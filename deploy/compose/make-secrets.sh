#!/bin/sh
# Writes the secret files compose.yaml mounts (deploy/secrets/, git-ignored), random where the relay makes its
# own; an existing file is kept. Put your Kling key in secrets/kling_api_key afterwards (or keep the random one
# for the simulator profile).
set -eu
cd "$(dirname "$0")/.."
mkdir -p secrets
chmod 700 secrets
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
keep_or_write() {  # name, value
    [ -s "secrets/$1" ] || { printf '%s\n' "$2" > "secrets/$1"; chmod 600 "secrets/$1"; }
}
keep_or_write kling_api_key "$(random)"
keep_or_write callback_secret "$(random)"
keep_or_write api_tokens "$(random)"
keep_or_write notify_secret "$(random)"
keep_or_write metrics_tokens "$(random)"
keep_or_write grafana_admin_password "$(random)"
keep_or_write minio_root_user "kling-relay"
keep_or_write minio_root_password "$(random)"
keep_or_write aws_credentials "$(printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s' \
    "$(cat secrets/minio_root_user)" "$(cat secrets/minio_root_password)")"
echo "secrets in $(pwd)/secrets: $(ls secrets | tr '\n' ' ')"
