#!/bin/sh
# Regenerates the test PKI in this directory: `cd tests/certs && sh gen.sh`.
# Needs the openssl CLI (written against OpenSSL 3.0). Keys: P-256, PKCS#8 PEM.
# Dates are explicit (not "now") so the files do not depend on the clock of the
# machine that generated them: valid 2020-01-01 .. 2120-01-01, except expired.pem.
set -eu
START=20200101000000Z
END=21200101000000Z
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cat > "$W/ca.cnf" <<'CNF'
[ ca ]
default_ca = tca
[ tca ]
database = $ENV::W/index.txt
serial = $ENV::W/serial
new_certs_dir = $ENV::W
default_md = sha256
policy = pol
copy_extensions = none
unique_subject = no
[ pol ]
commonName = supplied
[ req ]
distinguished_name = dn
[ dn ]
[ v3_ca ]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[ server ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1
[ wrong_host ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = DNS:wrong.example
[ client ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
export W
: > "$W/index.txt"
echo 1000 > "$W/serial"

# cert NAME CN EXT_SECTION ISSUER(-|ca-name) START END
cert() {
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key"
  openssl req -new -config "$W/ca.cnf" -key "$1.key" -subj "/CN=$2" -out "$W/$1.csr"
  if [ "$4" = - ]; then
    openssl ca -batch -config "$W/ca.cnf" -selfsign -keyfile "$1.key" -in "$W/$1.csr" \
      -extensions "$3" -startdate "$5" -enddate "$6" -notext -out "$1.pem"
  else
    openssl ca -batch -config "$W/ca.cnf" -cert "$4.pem" -keyfile "$4.key" -in "$W/$1.csr" \
      -extensions "$3" -startdate "$5" -enddate "$6" -notext -out "$1.pem"
  fi
}

cert ca           "wsbeat test CA"      v3_ca      -        $START $END
cert other-ca     "wsbeat unrelated CA" v3_ca      -        $START $END
cert server       localhost             server     ca       $START $END
cert other-server localhost             server     other-ca $START $END
cert wrong-host   wrong.example         wrong_host ca       $START $END
cert client       "wsbeat test client"  client     ca       $START $END
cert expired      localhost             server     ca       20000101000000Z 20010101000000Z
