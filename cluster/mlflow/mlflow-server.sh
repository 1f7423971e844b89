#!/usr/bin/env bash
# The team's MLflow tracking server for sr-pipeline: a database backend, artifacts in an object
# store (proxied by the server, so training nodes need no bucket credentials for MLflow), and
# MLflow's basic-auth app. This script never starts a server without authentication.
#
# Required environment (from your secret manager, never from argv: `ps` shows argv to everyone):
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics:  postgresql://mlflow:PW@db:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  checkpoints, images:    s3://my-sr-bucket/mlflow-artifacts
#   MLFLOW_AUTH_DATABASE_URI      users, permissions:     postgresql://mlflow:PW@db:5432/mlflow_auth
#   MLFLOW_AUTH_ADMIN_PASSWORD    first start only: the password of the admin user it creates
#   MLFLOW_FLASK_SERVER_SECRET_KEY  random, the same on every replica (CSRF protection of the
#                                 auth app): python -c "import secrets; print(secrets.token_hex(32))"
# Optional:
#   MLFLOW_HOST      127.0.0.1 (default; a TLS reverse proxy in front, see nginx.conf) or the
#                    interface a Kubernetes Service / load balancer reaches
#   MLFLOW_PORT      5000        MLFLOW_WORKERS  4
#   MLFLOW_ALLOWED_HOSTS          public host name(s) users type, e.g. mlflow.example.org
#   MLFLOW_AUTH_DEFAULT_PERMISSION READ (every user reads everything) or NO_PERMISSIONS
#   MLFLOW_AUTH_ADMIN_USERNAME    admin
#   MLFLOW_STATE_DIR              /var/lib/mlflow (holds the generated auth config, mode 600)
#   MLFLOW_BIN                    mlflow
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI to a database URI (e.g. postgresql://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlflow-artifacts)}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (the user/permission database)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (random; the same on every replica)}"
case "$MLFLOW_BACKEND_STORE_URI" in
  file:*|/*|./*) echo "error: MLFLOW_BACKEND_STORE_URI must be a database, not a directory" >&2; exit 1 ;;
esac

host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
workers=${MLFLOW_WORKERS:-4}
state=${MLFLOW_STATE_DIR:-/var/lib/mlflow}

umask 077
mkdir -p "$state"
chmod 700 "$state"
# The auth app reads its settings from an ini file; it holds the auth database URI (a
# secret), so it is generated here, private to this user, rather than kept in git.
cat > "$state/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$state/basic_auth.ini"
# Browsing and logging need no background job runner (it would add ~10 processes).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

args=(server --app-name basic-auth --host "$host" --port "$port" --workers "$workers")
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
echo "mlflow tracking server with basic auth on $host:$port (artifacts: $MLFLOW_ARTIFACTS_DESTINATION)" >&2
exec "${MLFLOW_BIN:-mlflow}" "${args[@]}"
