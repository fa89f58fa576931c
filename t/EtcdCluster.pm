# t/EtcdCluster.pm
#
# etcds for the TAP tests of secured setups, built on EtcdServer: a TLS etcd
# that asks for client certificates, an etcd with auth enabled, and a
# 3-member cluster bootstrapped together.  Also makes the test PKI with
# openssl, and small helpers the tests 009-012 share: SQL with SQLSTATEs
# from a background session, settings changed by ALTER SYSTEM and reload,
# and process facts from /proc.  (Its etcds are stopped by EtcdServer's END;
# the background session itself is EtcdServer::session.)
package EtcdCluster;

use strict;
use warnings;

use EtcdServer;
use File::Path;
use IPC::Run;
use JSON::PP;
use Math::BigInt;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @ISA = ('EtcdServer');

# new(name => N, tls => $pki, extra => [...], ctl => [...], no_start => 1)
#
# EtcdServer::new plus: tls: a hash from make_pki(); etcd then serves https
# only and requires a client certificate signed by $pki->{ca}.  ctl: more
# etcdctl flags, such as --user root:pw once auth is on.  listen_extra: more
# client URLs to listen on.
sub new
{
	my ($class, %opts) = @_;
	my $self = EtcdServer::new($class, %opts, no_start => 1);
	$self->{listen_extra} = $opts{listen_extra} // [];
	$self->{tls} = $opts{tls};
	$self->{ctl} = $opts{ctl} // [];
	$self->start unless $opts{no_start};
	return $self;
}

sub url
{
	my $self = shift;
	my $scheme = $self->{tls} ? 'https' : 'http';
	return "$scheme://127.0.0.1:$self->{client_port}";
}

sub peer_url { my $self = shift; return "http://127.0.0.1:$self->{peer_port}"; }

# Launch etcd; wait until it serves unless $self->{no_wait} (cluster members
# cannot serve before a quorum of them runs).
sub start
{
	my $self = shift;
	my $peer = $self->peer_url;
	my @tls;
	if (my $p = $self->{tls})
	{
		@tls = (
			'--cert-file', $p->{server_cert},
			'--key-file', $p->{server_key},
			'--trusted-ca-file', $p->{ca},
			'--client-cert-auth');
	}
	my @cluster = ('--initial-cluster', "$self->{name}=$peer");
	@cluster = (
		'--initial-cluster', $self->{initial_cluster},
		'--initial-cluster-state', 'new',
		'--initial-cluster-token', $self->{cluster_token})
	  if $self->{initial_cluster};
	my $listen = join ',', $self->url, @{ $self->{listen_extra} };
	my @cmd = (
		'etcd', '--name', $self->{name},
		'--data-dir', "$self->{dir}/data",
		'--listen-client-urls', $listen,
		'--advertise-client-urls', $self->url,
		'--listen-peer-urls', $peer,
		'--initial-advertise-peer-urls', $peer,
		@cluster, @tls,
		'--logger=zap', '--log-outputs=stderr', '--unsafe-no-fsync',
		@{ $self->{extra} });
	$self->{handle} = IPC::Run::start(\@cmd, '<', \undef, '>>', $self->{log}, '2>&1');
	$self->wait_healthy unless $self->{no_wait};
	return;
}

# Turn etcd auth on, with root:pw and a user pglock:secret whose role may
# read and write etcd_lock/ only; later etcdctl calls run as root.
sub enable_auth
{
	my $self = shift;
	$self->etcdctl('user', 'add', 'root:pw');
	$self->etcdctl('role', 'add', 'etcd_lock_role');
	$self->etcdctl('role', 'grant-permission', 'etcd_lock_role', '--prefix=true', 'readwrite', 'etcd_lock/');
	$self->etcdctl('user', 'add', 'pglock:secret');
	$self->etcdctl('user', 'grant-role', 'pglock', 'etcd_lock_role');
	$self->etcdctl('auth', 'enable');
	$self->{ctl} = [ '--user', 'root:pw' ];
	return;
}

# etcdctl's connection flags for this etcd: endpoint, TLS files, user.
sub ctl_flags
{
	my $self = shift;
	my @f = ('--endpoints', $self->url);
	if (my $p = $self->{tls})
	{
		push @f, '--cacert', $p->{ca}, '--cert', $p->{client_cert}, '--key', $p->{client_key};
	}
	return (@f, @{ $self->{ctl} });
}

# Run etcdctl; returns (ok, stdout, stderr).
sub try_etcdctl
{
	my ($self, @args) = @_;
	my ($out, $err) = ('', '');
	my $ok = IPC::Run::run([ 'etcdctl', $self->ctl_flags, @args ],
		'<', \undef, '>', \$out, '2>', \$err);
	return ($ok, $out, $err);
}

sub etcdctl
{
	my ($self, @args) = @_;
	my ($ok, $out, $err) = $self->try_etcdctl('--dial-timeout=2s', '--command-timeout=5s', @args);
	die "etcdctl @args failed: $err" unless $ok;
	return $out;
}

# Poll until this member answers a linearizable read (so it has a leader).
sub wait_healthy
{
	my $self = shift;
	my $end = time + 60;
	while (time < $end)
	{
		my ($ok) = $self->try_etcdctl('--dial-timeout=1s', '--command-timeout=1s',
			'get', 'health-probe');
		return 1 if $ok;
		usleep(100_000);
	}
	die "etcd $self->{name} did not become healthy, see $self->{log}";
}

# `etcdctl endpoint status` of this member: { member_id, leader } as strings
# (uint64 in JSON: kept exact with bignum), or undef when it does not answer.
sub status
{
	my $self = shift;
	my ($ok, $out) = $self->try_etcdctl('--dial-timeout=1s', '--command-timeout=1s',
		'endpoint', 'status', '-w', 'json');
	return undef unless $ok;
	my $st = eval { JSON::PP->new->allow_bignum->decode($out)->[0]{Status} };
	return undef unless $st;
	return {
		member_id => "$st->{header}{member_id}",
		leader => "$st->{leader}",
	};
}

sub is_leader
{
	my $self = shift;
	my $st = $self->status;
	return $st && $st->{leader} ne '0' && $st->{leader} eq $st->{member_id};
}

# Sum of etcd's Prometheus counter lines that match $re (a regex), from
# GET /metrics on the client URL.  grpc_server_handled_total counts the
# gateway's calls too, by method and code.
sub metric
{
	my ($self, $re) = @_;
	my $url = $self->url . '/metrics';
	my @curl = ('curl', '-sS', '--max-time', '5', $url);
	if (my $p = $self->{tls})
	{
		push @curl, '--cacert', $p->{ca}, '--cert', $p->{client_cert}, '--key', $p->{client_key};
	}
	my ($out, $err) = ('', '');
	IPC::Run::run(\@curl, '<', \undef, '>', \$out, '2>', \$err) or die "GET $url: $err";
	my $sum = 0;
	for (split /\n/, $out)
	{
		next if /^#/;
		$sum += $1 if /$re/ && /\s(\S+)$/;
	}
	return $sum;
}

# How many times etcd handled gRPC method $method (e.g. Authenticate),
# optionally only with grpc_code $code (e.g. Unauthenticated).
sub grpc_calls
{
	my ($self, $method, $code) = @_;
	my $re = qr/^grpc_server_handled_total\{.*grpc_method="\Q$method\E"/;
	$re = qr/^grpc_server_handled_total\{.*grpc_code="\Q$code\E".*grpc_method="\Q$method\E"/
	  if defined $code;
	return $self->metric($re);
}

# The cluster's members as etcd itself lists them (`etcdctl member list -w
# json`, asked of this member): { name => ID }, the uint64 IDs as exact
# decimal strings; undef when it does not answer.
sub member_ids
{
	my $self = shift;
	my ($ok, $out) = $self->try_etcdctl('--dial-timeout=2s', '--command-timeout=5s',
		'member', 'list', '-w', 'json');
	return undef unless $ok;
	my $j = eval { JSON::PP->new->allow_bignum->decode($out) } or return undef;
	return { map { $_->{name} => Math::BigInt->new("$_->{ID}")->bstr } @{ $j->{members} // [] } };
}

# Whether a uint64 member ID (a decimal string) is at least 2^63.
sub id_is_high
{
	my ($id) = @_;
	return Math::BigInt->new($id) >= Math::BigInt->new(2)->bpow(63);
}

# A cluster of $n members started at once; returns the members, each with
# {id}: its member ID as etcd's own answers give it (member list, confirmed
# by the member's own endpoint status), an exact decimal string.
#
# high_ids => 1 asks for every member ID at or above 2^63, as about half of
# real member IDs are: a client that reads these uint64 IDs as int64 then
# cannot tell the members apart.  etcd derives the IDs of a new cluster's
# members from its bootstrap (peer URLs, cluster token) in a way this module
# does not presume to know: it starts the cluster with one token after
# another, wiping the members' data in between, until etcd reports such IDs,
# for at most $MAX_TOKENS tokens (each has a 1 in 2^$n chance).  Should none
# do, it keeps the last cluster and sets {high_ids} to 0 in every member, so
# that the test can say it ran without that coverage.
my $MAX_TOKENS = 60;

sub cluster
{
	my ($class, $n, %opts) = @_;
	my $name = $opts{name} // 'member';
	my $high = delete $opts{high_ids};
	my @m = map { $class->new(%opts, name => "$name$_", no_start => 1) } 1 .. $n;
	my $initial = join ',', map { "$_->{name}=" . $_->peer_url } @m;
	my $ids;
	for my $try (1 .. ($high ? $MAX_TOKENS : 1))
	{
		my $token = $high ? "$name-token-$try" : "$name-token";
		$ids = start_members($token, $initial, @m);
		if (!$high || !grep { !id_is_high($_) } values %$ids)
		{
			$_->{high_ids} = $high ? 1 : 0 for @m;
			last;
		}
		note "cluster token $token: member IDs " . join(' ', map { $ids->{ $_->{name} } } @m)
		  . ', not all at or above 2^63';
		if ($try == $MAX_TOKENS)
		{
			diag "no cluster token out of $MAX_TOKENS gave member IDs all at or above 2^63";
			$_->{high_ids} = 0 for @m;
			last;
		}
		for my $mb (@m)
		{
			$mb->stop('KILL');
			File::Path::rmtree("$mb->{dir}/data");
		}
	}
	$_->{id} = $ids->{ $_->{name} } for @m;
	return @m;
}

# Start the members of a new cluster with cluster token $token, wait until
# each serves, and return their IDs by name as etcd lists them, checked
# against what each member says of itself.
#
# The members are launched 0.1 s apart: a new member first asks its peers
# whether it already belongs to their cluster, and waits about a second for
# each peer that has bound its port but does not serve yet, which all do
# when launched at the same instant (a cluster then takes over 2 s to serve,
# against well under 1 s this way).  This only saves time.
sub start_members
{
	my ($token, $initial, @m) = @_;
	for my $i (0 .. $#m)
	{
		my $mb = $m[$i];
		$mb->{initial_cluster} = $initial;
		$mb->{cluster_token} = $token;
		$mb->{no_wait} = 1;
		$mb->start;
		usleep(100_000) if $i < $#m;
	}
	$_->wait_healthy for @m;
	$_->{no_wait} = 0 for @m;
	my $ids = $m[0]->member_ids or die "etcdctl member list failed on $m[0]{name}";
	die 'etcd lists members ' . join(',', sort keys %$ids) . ', not ' . join(',', map { $_->{name} } @m)
	  unless join(',', sort keys %$ids) eq join(',', sort map { $_->{name} } @m);
	for my $mb (@m)
	{
		my $st = $mb->status or die "etcdctl endpoint status failed on $mb->{name}";
		die "$mb->{name} says its ID is $st->{member_id}, member list says $ids->{ $mb->{name} }"
		  unless $st->{member_id} eq $ids->{ $mb->{name} };
	}
	return $ids;
}

# ---------------------------------------------------------------------------
# Test PKI
# ---------------------------------------------------------------------------

my $openssl_cnf = <<'CNF';
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

sub openssl
{
	my @cmd = ('openssl', @_);
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err)
	  or die "openssl @_ failed: $err";
	return $out;
}

# Two CAs; a server certificate (serverAuth and clientAuth, which the gateway
# of etcd 3.4 and 3.5 needs, for 127.0.0.1 and localhost) and a client
# certificate from CA 1; a client certificate from CA 2.  Keys are P-256 EC.
# Returns the paths.
sub make_pki
{
	my $dir = PostgreSQL::Test::Utils::tempdir('pki');
	my $cnf = "$dir/openssl.cnf";
	open my $fh, '>', $cnf or die "$cnf: $!";
	print $fh $openssl_cnf;
	close $fh;
	my @newkey = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');
	my %p = (dir => $dir);

	for my $ca (1, 2)
	{
		openssl('req', '-x509', '-new', '-config', $cnf, '-extensions', 'ca_ext', @newkey,
			'-subj', "/CN=etcd_lock test CA $ca", '-days', '2',
			'-keyout', "$dir/ca$ca.key", '-out', "$dir/ca$ca.crt");
	}
	my $leaf = sub {
		my ($name, $ca, $ext, $cn) = @_;
		openssl('req', '-new', '-config', $cnf, @newkey, '-subj', "/CN=$cn",
			'-keyout', "$dir/$name.key", '-out', "$dir/$name.csr");
		openssl('x509', '-req', '-in', "$dir/$name.csr", '-CA', "$dir/ca$ca.crt",
			'-CAkey', "$dir/ca$ca.key", '-set_serial', int(rand(2**31)), '-days', '2',
			'-extfile', $cnf, '-extensions', $ext, '-out', "$dir/$name.crt");
		chmod 0600, "$dir/$name.key";
	};
	$leaf->('server', 1, 'server_ext', 'etcd server');
	$leaf->('client', 1, 'client_ext', 'pglock');
	$leaf->('client2', 2, 'client_ext', 'pglock');

	$p{ca} = "$dir/ca1.crt";
	$p{ca2} = "$dir/ca2.crt";
	$p{server_cert} = "$dir/server.crt";
	$p{server_key} = "$dir/server.key";
	$p{client_cert} = "$dir/client.crt";
	$p{client_key} = "$dir/client.key";
	$p{client2_cert} = "$dir/client2.crt";
	$p{client2_key} = "$dir/client2.key";
	return \%p;
}

# ---------------------------------------------------------------------------
# SQL helpers
# ---------------------------------------------------------------------------

# Run SQL in a background session: (stdout, stderr, elapsed seconds).
sub run_sql
{
	my ($s, $sql) = @_;
	$s->{stderr} = '';
	my $t0 = time;
	my $out = $s->query($sql);
	my $elapsed = time - $t0;
	my $err = $s->{stderr};
	$s->{stderr} = '';
	return ($out, $err, $elapsed);
}

# The SQLSTATE of the first ERROR in psql's verbose stderr, or ''.
sub sqlstate
{
	my ($err) = @_;
	return $err =~ /ERROR:  ([0-9A-Z]{5}):/ ? $1 : '';
}

# The first ERROR line of psql's stderr (message only), or ''.
sub errmsg
{
	my ($err) = @_;
	return $err =~ /ERROR:  [0-9A-Z]{5}: ([^\n]*)/ ? $1 : '';
}

sub quote_literal
{
	my ($v) = @_;
	$v =~ s/'/''/g;
	return "'$v'";
}

# A setting's name quoted for SQL: etcd_lock."user" ("user" is a keyword).
sub guc_ident
{
	my ($k) = @_;
	return join '.', map { qq{"$_"} } split /\./, $k;
}

# Change settings with ALTER SYSTEM (undef: RESET) and reload, then wait
# until every given session, and a new connection, sees the new values.  The
# sessions must be allowed to read them (superuser).
sub set_conf
{
	my ($node, $sessions, %kv) = @_;
	for my $k (sort keys %kv)
	{
		my $sql = defined $kv{$k}
		  ? 'ALTER SYSTEM SET ' . guc_ident($k) . ' = ' . quote_literal($kv{$k})
		  : 'ALTER SYSTEM RESET ' . guc_ident($k);
		$node->safe_psql('postgres', $sql);
	}
	# what each setting will be: for a RESET, the file's value or the default
	my %want;
	for my $k (sort keys %kv)
	{
		$want{$k} = $kv{$k} // $node->safe_psql('postgres', qq{
			SELECT coalesce(
				(SELECT setting FROM pg_file_settings WHERE name = '$k' AND applied
				 ORDER BY seqno DESC LIMIT 1),
				(SELECT boot_val FROM pg_settings WHERE name = '$k'))});
	}
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	for my $s (@$sessions)
	{
		for my $k (sort keys %kv)
		{
			my $end = time + $PostgreSQL::Test::Utils::timeout_default;
			my $got;
			while (time < $end)
			{
				($got) = run_sql($s, "SELECT current_setting('$k')");
				last if $got eq $want{$k};
				usleep(20_000);
			}
			die "session did not see $k = '$want{$k}' after reload (it sees '$got')"
			  unless $got eq $want{$k};
		}
	}
	for my $k (sort keys %kv)
	{
		$node->poll_query_until('postgres',
			"SELECT current_setting('$k') = " . quote_literal($want{$k}))
		  or die "$k not reloaded";
	}
	return;
}

# Poll $cond every 50 ms for at most $timeout seconds; returns whether it
# came true (and, unlike EtcdServer::poll_until, fails no test itself).
sub wait_until
{
	my ($cond, $timeout) = @_;
	my $end = time + ($timeout // $PostgreSQL::Test::Utils::timeout_default);
	while (time < $end)
	{
		return 1 if $cond->();
		usleep(50_000);
	}
	return $cond->() ? 1 : 0;
}

# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

# A field of /proc/PID/status, such as VmRSS or VmHWM, in kB (undef if gone).
sub proc_kb
{
	my ($pid, $field) = @_;
	open my $fh, '<', "/proc/$pid/status" or return undef;
	while (<$fh>)
	{
		return $1 if /^\Q$field\E:\s+(\d+) kB/;
	}
	return undef;
}

sub proc_ppid
{
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/status" or return undef;
	while (<$fh>)
	{
		return $1 if /^PPid:\s+(\d+)/;
	}
	return undef;
}

# PIDs of the node's lease workers: children of its postmaster whose title
# names the worker.  (It has no database connection, so pg_stat_activity
# does not list it.)
sub worker_pids
{
	my ($node) = @_;
	my $pm = $node->{_pid} or return ();
	my @pids;
	opendir my $d, '/proc' or die "/proc: $!";
	for my $pid (grep { /^\d+$/ } readdir $d)
	{
		open my $fh, '<', "/proc/$pid/cmdline" or next;
		my $cmd = do { local $/; <$fh> } // '';
		next unless $cmd =~ /etcd_lock lease worker/;
		push @pids, $pid if (proc_ppid($pid) // 0) == $pm;
	}
	closedir $d;
	return @pids;
}

# The server answers and no process of it died of a signal.
sub server_ok
{
	my ($node, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is($node->safe_psql('postgres', 'SELECT 1'), '1', "$what: server still answers");
	unlike(slurp_file($node->logfile), qr/terminated by signal|server process .* was terminated/,
		"$what: no process crashed");
	return;
}

1;
