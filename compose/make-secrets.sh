#!/bin/sh
# Create the broker secrets of the compose line:
#   secrets/<user>.password   one random password per user (mode 600), read by the service
#                             containers through SDRM_PASSWORD_FILE
#   mosquitto/passwd          the hashed password file of the broker
#   mosquitto/certs/          a broker certificate from a private CA (ca.crt, server.crt,
#                             server.key), only when server.crt does not exist yet. The CA's
#                             key goes to secrets/ca.key, which is not mounted into the broker.
# Existing password files are kept, so running the script again only adds new users; --force
# replaces the passwords of the given users. Usage:
#   compose/make-secrets.sh [--force] [USER ...]
# Without USER arguments it creates the users of docker-compose.yml. The broker's password file
# gets every user that has a file in secrets/. The passwords never appear on
# a command line: mosquitto_passwd -U hashes a plain-text copy in a private temporary folder.
# It uses the local mosquitto_passwd, or `docker run eclipse-mosquitto:2 mosquitto_passwd` when
# only Docker is installed, and openssl for the certificates.
set -eu

DEFAULT_USERS="scheduler compressor aggregator dev1 dev2 cam1 scada sparkplug"
# Host names in the broker certificate: the compose service name and the Docker host itself.
SERVER_NAMES="${SDRM_BROKER_NAMES:-DNS:mosquitto,DNS:localhost,IP:127.0.0.1}"
# The eclipse-mosquitto image runs the broker as this uid; it must read passwd and server.key.
MOSQUITTO_UID=1883

compose_dir=$(cd "$(dirname "$0")" && pwd)
secrets_dir="$compose_dir/secrets"
mosquitto_dir="$compose_dir/mosquitto"
certs_dir="$mosquitto_dir/certs"

force=0
if [ "${1:-}" = "--force" ]; then
    force=1
    shift
fi
users="${*:-$DEFAULT_USERS}"

umask 077
mkdir -p "$secrets_dir" "$certs_dir"
chmod 755 "$certs_dir"

random_password() {
    # 32 characters from [A-Za-z0-9], about 190 bits.
    head -c 96 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32
}

for user in $users; do
    case "$user" in
        *[!A-Za-z0-9_-]*) echo "make-secrets.sh: invalid user '$user': use letters, digits, '-' and '_'" >&2; exit 2 ;;
    esac
    file="$secrets_dir/$user.password"
    if [ "$force" = 1 ] || [ ! -s "$file" ]; then
        random_password > "$file"
        chmod 600 "$file"
        echo "created $file"
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$work/passwd"
# Every user with a password file goes into the broker's password file, so that adding one user
# keeps the others.
all_users=""
for file in "$secrets_dir"/*.password; do
    user=$(basename "$file" .password)
    all_users="$all_users $user"
    printf '%s:%s\n' "$user" "$(head -n 1 "$file")" >> "$work/passwd"
done

if command -v mosquitto_passwd > /dev/null 2>&1; then
    mosquitto_passwd -U "$work/passwd"
elif command -v docker > /dev/null 2>&1; then
    docker run --rm -v "$work:/work" eclipse-mosquitto:2 mosquitto_passwd -U /work/passwd
else
    echo "make-secrets.sh: neither mosquitto_passwd nor docker is installed: install mosquitto-clients or Docker" >&2
    exit 1
fi
cp "$work/passwd" "$mosquitto_dir/passwd"
chmod 600 "$mosquitto_dir/passwd"
echo "wrote $mosquitto_dir/passwd with users:$all_users"

if [ ! -f "$certs_dir/server.crt" ]; then
    if ! command -v openssl > /dev/null 2>&1; then
        echo "make-secrets.sh: openssl is not installed, so no TLS files were created: put ca.crt, server.crt and server.key into $certs_dir" >&2
        exit 1
    fi
    openssl ecparam -name prime256v1 -genkey -noout -out "$secrets_dir/ca.key"
    openssl req -x509 -new -key "$secrets_dir/ca.key" -sha256 -days 825 -subj "/CN=SDRM line private CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$certs_dir/ca.crt"
    openssl ecparam -name prime256v1 -genkey -noout -out "$certs_dir/server.key"
    openssl req -new -key "$certs_dir/server.key" -subj "/CN=mosquitto" -out "$work/server.csr"
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$SERVER_NAMES" > "$work/server.ext"
    openssl x509 -req -in "$work/server.csr" -CA "$certs_dir/ca.crt" -CAkey "$secrets_dir/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" \
        -days 825 -sha256 -extfile "$work/server.ext" -out "$certs_dir/server.crt"
    chmod 644 "$certs_dir/ca.crt" "$certs_dir/server.crt"
    echo "created a private CA and a broker certificate for $SERVER_NAMES in $certs_dir"
    echo "  clients verify the broker with --tls-ca $certs_dir/ca.crt; $secrets_dir/ca.key signs more certificates"
fi

if [ "$(id -u)" = 0 ]; then
    chown "$MOSQUITTO_UID" "$mosquitto_dir/passwd" "$certs_dir/server.key"
else
    echo "the broker container runs as uid $MOSQUITTO_UID and must read passwd and server.key:"
    echo "  sudo chown $MOSQUITTO_UID $mosquitto_dir/passwd $certs_dir/server.key"
fi
