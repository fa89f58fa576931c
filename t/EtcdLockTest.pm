# t/EtcdLockTest.pm
#
# What the TAP tests of etcd_lock share, built only on the documented API
# of PostgreSQL::Test::Cluster and IPC::Run:
#
#   - loading it skips the whole test file when etcd is not installed;
#   - poll_until(), the one way a test waits for something to come true,
#     and sample_for(), for checking that something stays true over a period;
#   - EtcdLockTest::Etcd: a real etcd on free loopback ports (plain, TLS with
#     client certificates, with auth on, or a member of a cluster) that a
#     test can stop, kill, pause and restart, and ask with etcdctl;
#   - EtcdLockTest::Session: a psql session of our own that keeps going after
#     errors, reports SQLSTATEs, and can leave a statement running;
#   - PostgreSQL nodes that preload etcd_lock, and facts about them: the
#     postmaster's and the lease worker's pids, etcd_lock_stats, and whether
#     anything crashed;
#   - a test PKI made with openssl, and settings changed by ALTER SYSTEM;
#   - hostile endpoints, and the checks that the server survives them.
#
# Every etcd started here is killed in END, and END keeps the test's exit
# status.
package EtcdLockTest;

use strict;
use warnings;

use Exporter;
use IO::Socket::INET;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

our @ISA = ('Exporter');
our @EXPORT = qw(
  have_command poll_until sample_for
  pg_node session postmaster_pid worker_pids server_ok stats stat_value
  lease_of proc_state proc_kb
  sqlstate errmsg set_conf superuser_only_ok make_pki
  hostile_endpoint hostile_suite
);

sub have_command
{
	my ($cmd) = @_;
	return scalar grep { -x "$_/$cmd" } split /:/, ($ENV{PATH} // '');
}

# Every test starts etcd and asks it things with etcdctl: without them there
# is nothing to test, which is a skip, not a failure.
sub import
{
	for my $cmd (qw(etcd etcdctl))
	{
		Test::More::plan(skip_all => "$cmd is not installed") unless have_command($cmd);
	}
	__PACKAGE__->export_to_level(1, @_);
	return;
}

# ---------------------------------------------------------------------------
# Waiting
# ---------------------------------------------------------------------------

# poll_until($cond, $timeout, $what, $interval): call $cond every $interval
# seconds (default 0.05) until it returns true, for at most $timeout seconds
# (the framework's default when undef).  Returns whether it came true; on a
# timeout it says what it was waiting for, and leaves failing to the caller.
sub poll_until
{
	my ($cond, $timeout, $what, $interval) = @_;
	$timeout //= $PostgreSQL::Test::Utils::timeout_default;
	$interval //= 0.05;
	my $end = time + $timeout;
	while (1)
	{
		return 1 if $cond->();
		last if time >= $end;
		usleep(1e6 * $interval);
	}
	note sprintf('gave up after %.1f s waiting for %s', $timeout, $what // 'a condition');
	return 0;
}

# sample_for($secs, $interval, $sub): call $sub every $interval seconds for
# $secs seconds, and once more at the end.  For a test that checks that
# something STAYS true over a period (a lock kept alive by renewals), where
# the period itself is what is tested.  Returns how many times it called $sub.
sub sample_for
{
	my ($secs, $interval, $sub) = @_;
	my $end = time + $secs;
	my $n = 0;
	while (1)
	{
		$sub->();
		$n++;
		my $left = $end - time;
		last if $left <= 0;
		usleep(1e6 * ($left < $interval ? $left : $interval));
	}
	return $n;
}

# ---------------------------------------------------------------------------
# PostgreSQL nodes
# ---------------------------------------------------------------------------

my %postmaster_at_start;    # by node name

# pg_node($name, $endpoints, $extra_conf, env => { VAR => value }): a started
# node that preloads etcd_lock, points it at $endpoints with a 1 s request
# timeout, and has the extension created.  env is set for the postmaster
# (and so for every backend and the worker) only.
sub pg_node
{
	my ($name, $endpoints, $extra_conf, %opt) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '$endpoints'
etcd_lock.request_timeout = '1s'
} . ($extra_conf // ''));
	{
		local %ENV = (%ENV, %{ $opt{env} // {} });
		$node->start;
	}
	$postmaster_at_start{$name} = postmaster_pid($node);
	$node->safe_psql('postgres', 'CREATE EXTENSION etcd_lock');
	return $node;
}

sub session { return EtcdLockTest::Session->new(@_); }

# The postmaster's pid, from the first line of postmaster.pid ('' if none).
sub postmaster_pid
{
	my ($node) = @_;
	open my $fh, '<', $node->data_dir . '/postmaster.pid' or return '';
	my $pid = <$fh> // '';
	close $fh;
	chomp $pid;
	return $pid;
}

# The node's lease workers, as pg_stat_activity lists them.
sub worker_pids
{
	my ($node) = @_;
	return split /\n/, $node->safe_psql('postgres',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'etcd_lock lease worker' ORDER BY pid});
}

# server_ok($node, $what, log_from => $offset): the server answers (waiting
# out a crash restart, so that a test can go on after one), its postmaster
# is the one pg_node started, and its log, from $offset on, shows no process
# that died of a signal, no PANIC, no failed assertion and no restart.
# Returns the log's size, for the next call's log_from.
sub server_ok
{
	my ($node, $what, %opt) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $answers = sub {
		my $out = '';
		my $err = '';
		return $node->psql('postgres', 'SELECT 1', stdout => \$out, stderr => \$err) == 0
		  && $out eq '1';
	};
	ok(poll_until($answers, 30, "$what: the server to answer"), "$what: the server answers");
	my $pm = $postmaster_at_start{ $node->name };
	if (defined $pm)
	{
		is(postmaster_pid($node), $pm, "$what: the postmaster is the one started ($pm)");
	}
	my $log = slurp_file($node->logfile, $opt{log_from} // 0);
	my $crash = qr/terminated by signal|was terminated|PANIC|TRAP:|server processes terminated|reinitializing/;
	my @bad = grep { /$crash/ } split /\n/, $log;
	is_deeply(\@bad, [], "$what: no crash, PANIC or restart in the server log");
	return ($opt{log_from} // 0) + length $log;
}

# etcd_lock_stats as a hash.
sub stats
{
	my ($node) = @_;
	return decode_json($node->safe_psql('postgres', 'SELECT row_to_json(s) FROM etcd_lock_stats s'));
}

# One column of etcd_lock_stats.
sub stat_value
{
	my ($node, $col) = @_;
	return $node->safe_psql('postgres', "SELECT $col FROM etcd_lock_stats");
}

# The lease ID (hex) at the end of a lock handle NAME/<lease>.
sub lease_of
{
	my ($handle) = @_;
	my ($lease) = ($handle // '') =~ m{/([0-9a-f]+)$};
	return $lease;
}

# ---------------------------------------------------------------------------
# Processes (Linux /proc)
# ---------------------------------------------------------------------------

# 'T' once every thread of the process has stopped, else the state letter
# of a thread that has not; '?' if the process is gone.
sub proc_state
{
	my ($pid) = @_;
	my @tasks = glob("/proc/$pid/task/*");
	return '?' unless @tasks;
	for my $task (@tasks)
	{
		open(my $fh, '<', "$task/stat") or return '?';
		my $line = <$fh> // '';
		close $fh;
		my ($state) = $line =~ /^\d+ \(.*\) (\S)/;
		return $state // '?' unless ($state // '') eq 'T';
	}
	return 'T';
}

# A field of /proc/PID/status in kB, such as VmHWM (undef if gone).
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

# ---------------------------------------------------------------------------
# SQL
# ---------------------------------------------------------------------------

# The SQLSTATE of the first ERROR in psql's verbose stderr, or ''.
sub sqlstate
{
	my ($err) = @_;
	return ($err // '') =~ /ERROR:  ([0-9A-Z]{5}):/ ? $1 : '';
}

# The message of that ERROR, or ''.
sub errmsg
{
	my ($err) = @_;
	return ($err // '') =~ /ERROR:  [0-9A-Z]{5}: ([^\n]*)/ ? $1 : '';
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

# superuser_only_ok($session, $setting): tests that a session without
# superuser rights can neither read the setting (SHOW, current_setting,
# pg_settings) nor change it (SET and set_config: a reload-only setting;
# ALTER SYSTEM).
sub superuser_only_ok
{
	my ($s, $setting) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $id = guc_ident($setting);
	my $lit = quote_literal($setting);
	my ($out, $err) = $s->query("SELECT count(*) FROM pg_settings WHERE name = $lit");
	is($out, '0', "non-superuser: pg_settings hides $setting");
	($out, $err) = $s->query("SHOW $id");
	is(sqlstate($err), '42501', "non-superuser: SHOW $setting is refused (42501)");
	($out, $err) = $s->query("SELECT current_setting($lit)");
	is(sqlstate($err), '42501', "non-superuser: current_setting('$setting') is refused (42501)");
	($out, $err) = $s->query("SET $id = ''");
	is(sqlstate($err), '55P02', "non-superuser: SET $setting fails (55P02: a reload-only setting)");
	($out, $err) = $s->query("SELECT set_config($lit, '', false)");
	is(sqlstate($err), '55P02', "non-superuser: set_config('$setting') fails (55P02)");
	($out, $err) = $s->query("ALTER SYSTEM SET $id = ''");
	is(sqlstate($err), '42501', "non-superuser: ALTER SYSTEM SET $setting is refused (42501)");
	return;
}

# set_conf($node, [sessions], name => value, ...): ALTER SYSTEM SET each
# setting (RESET for undef), reload, and wait until every given session, and
# a new connection, sees the new values.  The sessions must be allowed to
# read them (superuser).
sub set_conf
{
	my ($node, $sessions, %kv) = @_;
	for my $k (sort keys %kv)
	{
		$node->safe_psql('postgres', defined $kv{$k}
			? 'ALTER SYSTEM SET ' . guc_ident($k) . ' = ' . quote_literal($kv{$k})
			: 'ALTER SYSTEM RESET ' . guc_ident($k));
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
	for my $k (sort keys %kv)
	{
		for my $s (@$sessions)
		{
			poll_until(sub { $s->query("SELECT current_setting('$k')") eq $want{$k} },
				undef, "a session to see $k = '$want{$k}'")
			  or die "a session does not see $k = '$want{$k}' after the reload";
		}
		$node->poll_query_until('postgres',
			"SELECT current_setting('$k') = " . quote_literal($want{$k}))
		  or die "a new connection does not see $k = '$want{$k}' after the reload";
	}
	return;
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
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'openssl', @_ ], '<', \undef, '>', \$out, '2>', \$err)
	  or die "openssl @_ failed: $err";
	return $out;
}

# Two CAs; from CA 1 a server certificate (serverAuth and clientAuth, which
# the gateway of etcd 3.4 and 3.5 needs, for 127.0.0.1 and localhost) and a
# client certificate; from CA 2 a client certificate.  P-256 EC keys.
# Returns the paths.
sub make_pki
{
	my $dir = PostgreSQL::Test::Utils::tempdir('pki');
	my $cnf = "$dir/openssl.cnf";
	PostgreSQL::Test::Utils::append_to_file($cnf, $openssl_cnf);
	my @newkey = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes');

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

	return {
		dir => $dir,
		ca => "$dir/ca1.crt",
		ca2 => "$dir/ca2.crt",
		server_cert => "$dir/server.crt",
		server_key => "$dir/server.key",
		client_cert => "$dir/client.crt",
		client_key => "$dir/client.key",
		client2_cert => "$dir/client2.crt",
		client2_key => "$dir/client2.key",
	};
}

# ---------------------------------------------------------------------------
# Hostile endpoints: fake etcds that answer badly (t/012 for the JSON
# gateway, t/017 for gRPC)
# ---------------------------------------------------------------------------

my (%hostile_url, @hostile_runs);

# hostile_endpoint($mode, @cmd): start, once per mode, the fake endpoint that
# @cmd runs, with the argument 'PORT' replaced by a free loopback port; wait
# until it takes connections and return its URL.  Killed in END.
sub hostile_endpoint
{
	my ($mode, @cmd) = @_;
	return $hostile_url{$mode} if $hostile_url{$mode};
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	s/^PORT$/$port/ for @cmd;
	my $log = "$PostgreSQL::Test::Utils::log_path/hostile_$mode.log";
	push @hostile_runs, IPC::Run::start(\@cmd, '<', \undef, '>>', $log, '2>&1');
	poll_until(sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp') },
		30, "hostile endpoint $mode to listen", 0.02)
	  or die "hostile endpoint $mode did not start, see $log";
	return $hostile_url{$mode} = "http://127.0.0.1:$port";
}

END
{
	local $?;
	for my $h (@hostile_runs)
	{
		$h->signal('KILL');
		eval { $h->finish; };
	}
}

# hostile_request_ok($node, $s, $ep, $mode, [$code, $msg, $detail],
#                    seconds => S, kb => K)
#
# With etcd_lock.endpoints = $ep, etcd_lock() in session $s fails within S
# seconds with SQLSTATE $code (class 08), a message matching $msg (a regex
# source in which %EP% stands for the endpoint) and, unless $detail is
# undef, a DETAIL matching it; the backend's peak memory stays under K kB;
# the session and the server go on.  Returns what was seen, for a note.
sub hostile_request_ok
{
	my ($node, $s, $ep, $mode, $expect, %limit) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my ($code, $msg, $detail) = @$expect;
	my $qep = quotemeta($ep);
	$msg =~ s/%EP%/$qep/g;
	set_conf($node, [$s], 'etcd_lock.endpoints' => $ep);
	my ($out, $err, undef, $elapsed) = $s->query(q{SELECT etcd_lock('x')});
	note "$mode: $err";
	my $got = sqlstate($err);
	is($out, '', "$mode: no handle");
	like($got, qr/^08/, "$mode: a class-08 error");
	is($got, $code, "$mode: SQLSTATE $code");
	like(errmsg($err), qr/$msg/, "$mode: a clear message");
	like($err, qr/DETAIL:  [^\n]*$detail/, "$mode: the detail says what was wrong")
	  if defined $detail;
	cmp_ok($elapsed, '<', $limit{seconds},
		sprintf('%s: within %.0f s (%.2f s)', $mode, $limit{seconds}, $elapsed));
	my $hwm = proc_kb($s->pid, 'VmHWM');
	cmp_ok($hwm, '<', $limit{kb}, "$mode: the backend's peak memory stays bounded ($hwm kB)");
	is($s->query_safe('SELECT 1'), '1', "$mode: the session goes on");
	server_ok($node, $mode);
	return sprintf('%s: %s (%.2f s)', $got, errmsg($err), $elapsed);
}

# hostile_worker_ok($node, $s, $etcd, $ep, $mode, $wpid, $max_kb)
#
# The lease worker meets $ep while it renews a ttl-6 lock of session $s (a
# keepalive every 2 s, a retry 1 s after a failure), until one keepalive
# went to it (at most 2 s, plus 1 s for an endpoint that never answers);
# then $etcd is back, and the worker's retry must renew the lease before it
# can expire.  The same worker ($wpid) runs on with its peak
# memory under $max_kb kB, the lock is still held, and it is released.
sub hostile_worker_ok
{
	my ($node, $s, $etcd, $ep, $mode, $wpid, $max_kb) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $h = $s->query_safe(q{SELECT etcd_lock('w', 6)});
	my $lease = lease_of($h);
	my $f0 = stat_value($node, 'failures');
	set_conf($node, [$s], 'etcd_lock.endpoints' => $ep);
	# the worker met it: a keepalive failed, or (wrongly) found the lease gone
	ok( $node->poll_query_until('postgres', qq{SELECT failures > $f0 OR EXISTS
			(SELECT FROM etcd_locks WHERE key = 'w' AND state = 'lost') FROM etcd_lock_stats}),
		"worker vs $mode: a keepalive went to it");
	set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);
	is_deeply([ worker_pids($node) ], [$wpid], "worker vs $mode: the same worker still runs");
	my $hwm = proc_kb($wpid, 'VmHWM');
	cmp_ok($hwm, '<', $max_kb, "worker vs $mode: its peak memory stays bounded ($hwm kB)");
	# renewed again on etcd: the remaining TTL is back near 6 s
	ok( poll_until(sub {
				my ($ok, $o) = $etcd->try_etcdctl('lease', 'timetolive', $lease);
				$ok && $o =~ /remaining\([56]s\)/ }, 10, "worker vs $mode: a renewal on etcd"),
		"worker vs $mode: renewed on etcd afterwards");
	is($node->safe_psql('postgres', q{SELECT state FROM etcd_locks WHERE key = 'w'}), 'held',
		"worker vs $mode: the lock is still held");
	my ($out, $err) = $s->query(qq{SELECT etcd_unlock('$h')});
	is($out, 't', "worker vs $mode: etcd_unlock returns true");
	note "worker vs $mode: unlock said: $err" if $err;
	$s->query('SELECT etcd_unlock_all()');
	is_deeply([ $etcd->leases ], [], "worker vs $mode: no lease left");
	return;
}

# hostile_suite($node, $etcd, $start, \%expect, \@modes, seconds => S,
#               kb => K, worker_skip => [modes])
#
# What t/012 and t/017 check.  $start->($mode) starts the hostile endpoint of
# a mode and returns its URL.  For each mode, a lock call fails as
# $expect{$mode} says (hostile_request_ok); the same session then locks on
# $etcd again; the lease worker meets each mode, but those in worker_skip,
# while it renews a lease (hostile_worker_ok), and is the same process at
# the end, having never exited; nothing is left anywhere.
sub hostile_suite
{
	my ($node, $etcd, $start, $expect, $modes, %opt) = @_;
	my $s = session($node);
	my %observed;
	$observed{$_} = hostile_request_ok($node, $s, $start->($_), $_, $expect->{$_}, %opt)
	  for @$modes;

	# back to the real etcd: the same session locks
	set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);
	my $h = $s->query_safe(q{SELECT etcd_lock('x')});
	like($h, qr{^etcd_lock/x/[0-9a-f]+$}, 'back on etcd: the same session locks');
	is($s->query_safe('SELECT etcd_unlock_all()'), '1', 'back on etcd: and unlocks');
	$etcd->no_leftovers('back on etcd', 'etcd_lock/');

	my @wpids = worker_pids($node);
	is(scalar(@wpids), 1, 'one lease worker runs');
	my $wpid = $wpids[0];
	my %skip = map { $_ => 1 } @{ $opt{worker_skip} // [] };
	hostile_worker_ok($node, $s, $etcd, $start->($_), $_, $wpid, $opt{kb})
	  for grep { !$skip{$_} } @$modes;
	server_ok($node, 'worker');
	unlike(slurp_file($node->logfile), qr/lease worker" \(PID \d+\) exited/, 'the worker never exited');

	$s->quit;
	$etcd->wait_empty('etcd_lock/');
	$etcd->no_leftovers('at the end', 'etcd_lock/');
	is_deeply([ worker_pids($node) ], [$wpid], 'the worker that met every hostile endpoint still runs');
	server_ok($node, 'end');
	note "observed: $_ => $observed{$_}" for @$modes;
	return;
}

# ===========================================================================
# EtcdLockTest::Etcd
# ===========================================================================
package EtcdLockTest::Etcd;

use strict;
use warnings;

use File::Path;
use IPC::Run;
use JSON::PP;
use Math::BigInt;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my @started;    # every etcd made here, killed in END

# new(name => N, extra => [etcd flags], tls => $pki, ctl => [etcdctl flags],
#     listen_extra => [client URLs], no_start => 1)
#
# Free ports, a data directory and a log under the test's log directory.
# tls: a hash from make_pki(); etcd then serves https only and requires a
# client certificate signed by $pki->{ca}.  ctl: more etcdctl flags, such as
# --user.  listen_extra: more client URLs to listen on.
sub new
{
	my ($class, %opt) = @_;
	my $self = bless {
		name => $opt{name} // 'etcd',
		client_port => PostgreSQL::Test::Cluster::get_free_port(),
		peer_port => PostgreSQL::Test::Cluster::get_free_port(),
		extra => $opt{extra} // [],
		tls => $opt{tls},
		ctl => $opt{ctl} // [],
		listen_extra => $opt{listen_extra} // [],
	}, $class;
	$self->{dir} = PostgreSQL::Test::Utils::tempdir("etcd_$self->{name}");
	$self->{log} = "$PostgreSQL::Test::Utils::log_path/etcd_$self->{name}.log";
	push @started, $self;
	$self->start unless $opt{no_start};
	return $self;
}

sub name { return $_[0]{name}; }

# The member ID etcd reported for a member started by cluster().
sub id { return $_[0]{id}; }

sub url
{
	my ($self) = @_;
	my $scheme = $self->{tls} ? 'https' : 'http';
	return "$scheme://127.0.0.1:$self->{client_port}";
}

sub peer_url { my ($self) = @_; return "http://127.0.0.1:$self->{peer_port}"; }

# Whether this test started it and has not stopped it since.
sub running { my ($self) = @_; return defined $self->{handle}; }

# Launch etcd and, unless $no_wait (members of a new cluster cannot serve
# before a quorum of them runs), wait until it serves.  A shell writes its
# own pid to a file and then becomes etcd: that file gives etcd's pid.
sub start
{
	my ($self, $no_wait) = @_;
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
	my @cmd = (
		'etcd', '--name', $self->{name},
		'--data-dir', "$self->{dir}/data",
		'--listen-client-urls', join(',', $self->url, @{ $self->{listen_extra} }),
		'--advertise-client-urls', $self->url,
		'--listen-peer-urls', $peer,
		'--initial-advertise-peer-urls', $peer,
		@cluster, @tls,
		'--logger=zap', '--log-outputs=stderr', '--unsafe-no-fsync',
		@{ $self->{extra} });
	my $pidfile = "$self->{dir}/etcd.pid";
	unlink $pidfile;
	$self->{pid} = undef;
	$self->{handle} = IPC::Run::start(
		[ 'sh', '-c', 'echo $$ > "$0" && exec "$@"', $pidfile, @cmd ],
		'<', \undef, '>>', $self->{log}, '2>&1');
	$self->wait_healthy unless $no_wait;
	return;
}

# Wait until this member answers a linearizable read (so it has a leader).
sub wait_healthy
{
	my ($self) = @_;
	EtcdLockTest::poll_until(sub { ($self->try_etcdctl('--dial-timeout=1s', '--command-timeout=1s',
					'get', 'health-probe'))[0] }, 60, "etcd $self->{name} to serve", 0.1)
	  or die "etcd $self->{name} did not become healthy, see $self->{log}";
	return;
}

# etcd's pid (the file its shell wrote before it became etcd).
sub pid
{
	my ($self) = @_;
	return $self->{pid} if $self->{pid};
	my $file = "$self->{dir}/etcd.pid";
	EtcdLockTest::poll_until(sub { -s $file }, 10, "$file to be written")
	  or die "etcd $self->{name} wrote no pid file";
	chomp(my $pid = PostgreSQL::Test::Utils::slurp_file($file));
	return $self->{pid} = $pid;
}

# Stop etcd: SIGTERM by default, or the signal given (KILL for a crash).
sub stop
{
	my ($self, $sig) = @_;
	my $h = $self->{handle} or return;
	$h->signal('CONT');
	$h->signal($sig // 'TERM');
	eval { $h->finish; };
	$self->{handle} = undef;
	return;
}

# SIGSTOP, then wait until every thread of etcd has stopped: the signal
# takes effect after kill() returns.
sub pause
{
	my ($self) = @_;
	my $pid = $self->pid;
	$self->{handle}->signal('STOP');
	EtcdLockTest::poll_until(sub { EtcdLockTest::proc_state($pid) eq 'T' },
		10, "etcd $self->{name} to stop", 0.01)
	  or die "etcd $self->{name} did not stop";
	return;
}

sub resume { my ($self) = @_; $self->{handle}->signal('CONT'); return; }

# etcdctl's connection flags for this etcd: endpoint, TLS files, user.
sub ctl_flags
{
	my ($self) = @_;
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

# Run etcdctl; returns stdout, dies on failure.
sub etcdctl
{
	my ($self, @args) = @_;
	my ($ok, $out, $err) = $self->try_etcdctl('--dial-timeout=2s', '--command-timeout=5s', @args);
	die "etcdctl @args failed: $err" unless $ok;
	return $out;
}

# Keys under a prefix, as a list.
sub keys
{
	my ($self, $prefix) = @_;
	return grep { $_ ne '' } split /\n/, $self->etcdctl('get', '--prefix', $prefix, '--keys-only');
}

# key_kept($key, $secs): look $key up every 0.2 s for $secs seconds; returns
# how many times, and how many of them it was not there.
sub key_kept
{
	my ($self, $key, $secs) = @_;
	my $missing = 0;
	my $checks = EtcdLockTest::sample_for($secs, 0.2, sub {
			my @k = $self->keys($key);
			$missing++ unless @k == 1 && $k[0] eq $key;
		});
	return ($checks, $missing);
}

# Lease IDs that etcd still has, in lower-case hex without leading zeros, as
# in lock keys (etcdctl pads them to 16 digits).
sub leases
{
	my ($self) = @_;
	my @lines = split /\n/, $self->etcdctl('lease', 'list');
	shift @lines;    # "found N leases"
	$_ = lc for @lines;
	s/^0+(?=[0-9a-f])// for @lines;
	return @lines;
}

# Test: no key under $prefix (default: none at all) and no lease in etcd.
sub no_leftovers
{
	my ($self, $what, $prefix) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is_deeply([ $self->keys($prefix // '') ], [], "$what: no key left in etcd");
	is_deeply([ $self->leases ], [], "$what: no lease left in etcd");
	return;
}

# Wait until there is no key under $prefix (default: none at all) and no
# lease in etcd, for at most $timeout seconds; returns whether that came.
sub wait_empty
{
	my ($self, $prefix, $timeout) = @_;
	return EtcdLockTest::poll_until(sub { !$self->keys($prefix // '') && !$self->leases },
		$timeout, "etcd $self->{name} to be empty");
}

# Turn etcd auth on, with root:pw and a user pglock (password $password)
# whose role may read and write etcd_lock/ only; later etcdctl calls run as
# root.
sub enable_auth
{
	my ($self, $password) = @_;
	$self->etcdctl('user', 'add', 'root:pw');
	$self->etcdctl('role', 'add', 'etcd_lock_role');
	$self->etcdctl('role', 'grant-permission', 'etcd_lock_role', '--prefix=true', 'readwrite', 'etcd_lock/');
	$self->add_pglock($password);
	$self->etcdctl('auth', 'enable');
	$self->{ctl} = [ '--user', 'root:pw' ];
	return;
}

# (Re)create the user pglock with $password, in role etcd_lock_role.
# Deleting the user also ends its tokens.
sub add_pglock
{
	my ($self, $password) = @_;
	$self->etcdctl('user', 'delete', 'pglock') if $self->{pglock};
	$self->etcdctl('user', 'add', "pglock:$password");
	$self->etcdctl('user', 'grant-role', 'pglock', 'etcd_lock_role');
	$self->{pglock} = 1;
	return;
}

# `etcdctl endpoint status` of this member: { member_id, leader } as exact
# decimal strings (uint64 in JSON), or undef when it does not answer.
sub status
{
	my ($self) = @_;
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
	my ($self) = @_;
	my $st = $self->status;
	return $st && $st->{leader} ne '0' && $st->{leader} eq $st->{member_id};
}

# Of the given members still running, the one leader; undef unless exactly
# one of them says it leads.
sub leader_of
{
	my ($class, @members) = @_;
	my @l = grep { $_->running && $_->is_leader } @members;
	return @l == 1 ? $l[0] : undef;
}

# Sum of etcd's Prometheus counter lines that match $re, from GET /metrics.
# grpc_server_handled_total counts the gateway's calls too, by method and
# code.
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
# optionally only those that ended with grpc_code $code (e.g. OK).
sub grpc_calls
{
	my ($self, $method, $code) = @_;
	my $re = qr/^grpc_server_handled_total\{.*grpc_method="\Q$method\E"/;
	$re = qr/^grpc_server_handled_total\{.*grpc_code="\Q$code\E".*grpc_method="\Q$method\E"/
	  if defined $code;
	return $self->metric($re);
}

# The cluster's members as etcd lists them, asked of this member:
# { name => ID }, the uint64 IDs as exact decimal strings; undef when it
# does not answer.
sub member_ids
{
	my ($self) = @_;
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

# cluster($n, name => N, high_ids => 1, ...): a cluster of $n members
# started together (other options as for new); returns the members, each
# knowing its member ID as etcd's own answers give it.
#
# high_ids => 1 asks for every member ID at or above 2^63, as about half of
# real member IDs are: a client that reads these uint64 IDs as int64 then
# cannot tell the members apart.  etcd derives a new cluster's member IDs
# from its bootstrap (peer URLs, cluster token) in a way this module does
# not presume to know: it starts the cluster with one token after another,
# wiping the members' data in between, until etcd reports such IDs, for at
# most $MAX_TOKENS tokens (each has a 1 in 2^$n chance).  Should none do, it
# keeps the last cluster and high_ids() is false on its members, so that the
# test can say it ran without that coverage.
my $MAX_TOKENS = 60;

sub cluster
{
	my ($class, $n, %opt) = @_;
	my $name = $opt{name} // 'member';
	my $high = delete $opt{high_ids};
	my @m = map { $class->new(%opt, name => "$name$_", no_start => 1) } 1 .. $n;
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

sub high_ids { return $_[0]{high_ids}; }

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
		$m[$i]{initial_cluster} = $initial;
		$m[$i]{cluster_token} = $token;
		$m[$i]->start('no_wait');
		usleep(100_000) if $i < $#m;
	}
	$_->wait_healthy for @m;
	my $ids = $m[0]->member_ids or die "etcdctl member list failed on $m[0]{name}";
	die 'etcd lists members ' . join(',', sort CORE::keys %$ids) . ', not ' . join(',', map { $_->{name} } @m)
	  unless join(',', sort CORE::keys %$ids) eq join(',', sort map { $_->{name} } @m);
	for my $mb (@m)
	{
		my $st = $mb->status or die "etcdctl endpoint status failed on $mb->{name}";
		die "$mb->{name} says its ID is $st->{member_id}, member list says $ids->{ $mb->{name} }"
		  unless $st->{member_id} eq $ids->{ $mb->{name} };
	}
	return $ids;
}

END
{
	local $?;
	$_->stop('KILL') for grep { $_->running } @started;
}

# ===========================================================================
# EtcdLockTest::Session
# ===========================================================================
package EtcdLockTest::Session;

# A psql reading statements from a pipe, like the framework's background
# psql, but ours: it goes on after errors, prints errors in the verbose form
# ("ERROR:  SQLSTATE: message"), hands back each statement's stderr and
# SQLSTATE, and can leave a statement running while the test does other
# things.  Each statement is followed by a marker echoed to both stdout and
# stderr, so the session knows when all of its output has arrived.

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(time);

# new($node, dbname => D, user => U)
sub new
{
	my ($class, $node, %opt) = @_;
	my $self = bless { node => $node, in => '', out => '', err => '', n => 0 }, $class;
	my @cmd = ('psql', '-XAtq', '-v', 'ON_ERROR_STOP=0',
		'-d', $node->connstr($opt{dbname} // 'postgres'), '-f', '-');
	push @cmd, '-U', $opt{user} if defined $opt{user};
	# woken by this timer, a wait for output can give up in time
	$self->{timer} = IPC::Run::timer($PostgreSQL::Test::Utils::timeout_default);
	$self->{run} = IPC::Run::start(\@cmd, '<', \$self->{in}, '>', \$self->{out},
		'2>', \$self->{err}, $self->{timer});
	$self->query_safe('\set VERBOSITY verbose');
	$self->{pid} = $self->query_safe('SELECT pg_backend_pid()');
	return $self;
}

# The pid of the session's backend.
sub pid { return $_[0]{pid}; }

# Send SQL (and psql commands) followed by the end marker; a statement that
# ends without ";" (or a psql command) gets one, and \echo :SQLSTATE reports
# how the last statement ended.  Nothing else may be sent after it: a lone
# ";" would reset SQLSTATE.
sub _send
{
	my ($self, $sql, $start_marker) = @_;
	my $n = ++$self->{n};
	$self->{mark} = "etcd_lock_test:end:$n";
	$self->{out} = '';
	$self->{err} = '';
	$sql =~ s/\s+\z//;
	$sql .= ';' unless $sql =~ /;\z/ || $sql =~ /(?:^|\s)\\[a-z][^\n]*\z/;
	$self->{in} .= ($start_marker ? "\\echo etcd_lock_test:start:$n\n" : '')
	  . "$sql\n\\echo $self->{mark} :SQLSTATE\n\\warn $self->{mark}\n";
	$self->{t0} = time;
	return $n;
}

# Pump psql's output until $cond holds, psql exits or $limit seconds pass.
sub _pump_until
{
	my ($self, $cond, $limit) = @_;
	$self->{timer}->start($limit);
	while (!$cond->())
	{
		return 0 if $self->{timer}->is_expired || !$self->{run}->pumpable;
		$self->{run}->pump;
	}
	return 1;
}

sub _ended
{
	my ($self) = @_;
	return $self->{out} =~ /\Q$self->{mark}\E [^\n]*\n/ && $self->{err} =~ /\Q$self->{mark}\E\n/;
}

# The started statement's results: (stdout, stderr, SQLSTATE, seconds).
sub _results
{
	my ($self) = @_;
	my ($out, $state) = $self->{out} =~ /^(.*?)\Q$self->{mark}\E ([^\n]*)\n/s;
	$out =~ s/\n\z//;
	$state = '' unless $state =~ /^[0-9A-Z]{5}$/;    # no statement run yet
	(my $err = $self->{err}) =~ s/\Q$self->{mark}\E\n//;
	my $secs = time - $self->{t0};
	$self->{out} = '';
	$self->{err} = '';
	$self->{mark} = undef;
	return ($out, $err, $state, $secs);
}

# query($sql, $limit): run it and wait for its end, at most $limit seconds
# (the framework's default); dies if it does not end.  In list context
# (stdout, stderr, SQLSTATE of the last statement, seconds), else stdout.
sub query
{
	my ($self, $sql, $limit) = @_;
	$self->_send($sql);
	$self->_pump_until(sub { $self->_ended }, $limit // $PostgreSQL::Test::Utils::timeout_default)
	  or die "psql: no end of <$sql>: "
	  . ($self->{run}->pumpable ? 'timed out' : 'psql exited') . ", stderr: $self->{err}";
	my @r = $self->_results;
	return wantarray ? @r : $r[0];
}

# As query, but dies if the statement wrote anything to stderr.
sub query_safe
{
	my ($self, $sql) = @_;
	my ($out, $err) = $self->query($sql);
	die "query failed: <$sql>: $err" if $err ne '';
	return $out;
}

# start($sql): send it and return once psql has begun to run it, leaving it
# running; finish() or done() tells when it ends.
sub start
{
	my ($self, $sql) = @_;
	my $n = $self->_send($sql, 1);
	my $started = qr/etcd_lock_test:start:$n\n/;
	$self->_pump_until(sub { $self->{out} =~ $started }, $PostgreSQL::Test::Utils::timeout_default)
	  or die "psql did not start <$sql>";
	$self->{out} =~ s/^.*?$started//s;
	return;
}

# Whether the started statement has ended (without waiting).
sub done
{
	my ($self) = @_;
	$self->{run}->pump_nb if $self->{run}->pumpable;
	return $self->_ended;
}

# finish($limit): wait at most $limit seconds (the framework's default) for
# the started statement to end.  Returns (ended, stdout, stderr, SQLSTATE,
# seconds since it was sent); when it has not ended, only (0), and the
# statement can still be finished later.
sub finish
{
	my ($self, $limit) = @_;
	return (0) unless $self->_pump_until(sub { $self->_ended },
		$limit // $PostgreSQL::Test::Utils::timeout_default);
	return (1, $self->_results);
}

# Cancel the running statement (pg_cancel_backend from a new connection).
sub cancel
{
	my ($self) = @_;
	$self->{node}->safe_psql('postgres', "SELECT pg_cancel_backend($self->{pid})");
	return;
}

# End psql, also when its backend is already gone.
sub quit
{
	my ($self) = @_;
	my $run = $self->{run};
	my $ok = eval {
		$run->pump_nb if $run->pumpable;
		$self->{in} .= "\\q\n" if $run->pumpable;
		$run->finish;
		1;
	};
	eval { $run->kill_kill(grace => 5); } unless $ok;
	return;
}

1;
