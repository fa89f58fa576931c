# Faults inside COMMIT and ABORT processing.  An LD_PRELOAD shim
# (t/fault_shim.c, built here) makes libcurl's curl_multi_add_handle fail
# with CURLM_OUT_OF_MEMORY while a fault file exists, so no etcd request can
# even be started.  The fault is switched on just before a lock is released
# and off right after:
#  (a) COMMIT (with etcd_lock.commit_check = off, so the release after the
#      commit is the first request to fail);
#  (b) ROLLBACK;
#  (c) ROLLBACK TO SAVEPOINT, then COMMIT;
#  (d) an error that aborts the transaction, then ROLLBACK;
#  (e) a session that ends while holding a session lock.
# Each asserts: no PANIC, no crash and no restart of the server (the log,
# and the postmaster's pid); in a-d the statement ends as it would without
# the fault (COMMIT commits, ROLLBACK [TO SAVEPOINT] succeeds, 1/0 fails with
# 22012 only), with a WARNING and no other ERROR, and the session still
# answers; once the fault is over the lock is freed while its session idles
# (2*ttl+5 s for a-d, ttl+5 s for e), and another session can take it; with
# the session closed, etcd_lock_stats drops to 0 leases and 0 locks and no
# key or lease is left in etcd.  The server runs with restart_after_crash =
# on so that on a build that crashes the later cases still run.
# A sanity check first shows that the shim works: with the fault on, a plain
# etcd_lock() fails with an ERROR.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdServer;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $TTL = 5;

# --- the shim ----------------------------------------------------------------

if (!grep { -x "$_/cc" } split /:/, ($ENV{PATH} // ''))
{
	plan skip_all => 'no C compiler (cc) in PATH to build the fault-injection shim';
}
my $dir = PostgreSQL::Test::Utils::tempdir('callback_faults');
my $shim = "$dir/fault_shim.so";
my $fault = "$dir/fault";
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'cc', '-shared', '-fPIC', '-o', $shim, "$FindBin::RealBin/fault_shim.c", '-ldl' ],
		'<', \undef, '>', \$out, '2>', \$err)
	  or die "could not build the fault shim: $err";
}

sub fault_on
{
	open(my $fh, '>', $fault) or die "could not create $fault: $!";
	close $fh;
	return;
}
sub fault_off { unlink $fault; return; }

# --- the servers ---------------------------------------------------------------

my $etcd = EtcdServer->new(name => 'callback_faults');

# as EtcdServer::pg_node, but the postmaster (and so every backend and the
# lease worker) preloads the shim.  restart_after_crash = on: on a build that
# crashes, one case's crash does not take the later cases with it; each case
# looks for a crash or a restart in its own part of the log.
my $node = PostgreSQL::Test::Cluster->new('callback_faults');
$node->init;
$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = 'etcd_lock'
etcd_lock.endpoints = '@{[ $etcd->url ]}'
etcd_lock.request_timeout = '1s'
restart_after_crash = on
});
{
	local $ENV{LD_PRELOAD} = $shim;
	local $ENV{ETCD_LOCK_FAULT_FILE} = $fault;
	$node->start;
}
$node->safe_psql('postgres', 'CREATE EXTENSION etcd_lock');
$node->safe_psql('postgres', 'CREATE TABLE t (id int PRIMARY KEY)');

sub postmaster_pid
{
	open(my $fh, '<', $node->data_dir . '/postmaster.pid') or return '';
	my $pid = <$fh>;
	close $fh;
	chomp $pid;
	return $pid;
}
my $pm_pid = postmaster_pid();
like(slurp_file("/proc/$pm_pid/environ"), qr/(?:^|\0)LD_PRELOAD=\Q$shim\E(?:\0|$)/,
	'the postmaster was started with LD_PRELOAD=fault_shim.so');
like(slurp_file("/proc/$pm_pid/maps"), qr/fault_shim\.so/,
	'the postmaster has the shim mapped');
ok(($ENV{LD_PRELOAD} // '') !~ /fault_shim/, 'psql and etcdctl run without the shim');

# --- helpers -------------------------------------------------------------------

# A background session (verbose errors) that knows its backend's pid.
sub session
{
	my $s = EtcdServer::session($node);
	$s->{pid} = $s->query_safe('SELECT pg_backend_pid()');
	return $s;
}

# Run SQL in a session; returns its output, its stderr and the SQLSTATE of
# its last statement (00000 on success), or DEAD if psql went away (the
# backend crashed).
sub run_sql
{
	my ($s, $sql) = @_;
	$sql .= ';' unless $sql =~ /;\s*$/;
	return ('', 'the session is gone', 'DEAD') if $s->{dead};
	my $out = eval { $s->query("$sql\n\\echo SQLSTATE=:SQLSTATE") };
	my $err = $s->{stderr} // '';
	$s->{stderr} = '';
	if (!defined $out)
	{
		$s->{dead} = 1;
		return ('', $err . ($@ // ''), 'DEAD');
	}
	my ($state) = $out =~ s/\n?SQLSTATE=(\w+)$//s ? ($1) : ('?');
	return ($out, $err, $state);
}

sub close_session
{
	my ($s) = @_;
	if ($s->{dead}) { eval { $s->{run}->finish; }; return; }
	eval { $s->quit; };
	return;
}

# A query in a new connection; undef if it fails (never dies).
sub sql
{
	my ($query) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres', $query, stdout => \$out, stderr => \$err);
	return $rc == 0 ? $out : undef;
}

# Poll a condition every 50 ms for at most $bound seconds; never dies.
sub poll
{
	my ($cond, $bound) = @_;
	my $end = time + $bound;
	while (1)
	{
		return 1 if eval { $cond->() };
		return 0 if time > $end;
		usleep(50_000);
	}
}

sub stats { return sql('SELECT leases || \'/\' || locks FROM etcd_lock_stats') // '?'; }

# The server did not crash or restart since the last check (each part of the
# log is checked once), and answers.
my $log_pos = 0;
sub no_crash
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $up = poll(sub { defined sql('SELECT 1') }, 30);
	ok($up, "$what: the server answers");
	my $log = slurp_file($node->logfile, $log_pos);
	$log_pos += length $log;
	my @bad = grep { /PANIC|terminated by signal|TRAP:|server processes terminated|reinitializing/ }
	  split /\n/, $log;
	ok(!@bad, "$what: no PANIC, crash or restart in the server log")
	  or diag(join("\n", @bad[ 0 .. ($#bad < 5 ? $#bad : 5) ]));
	is(postmaster_pid(), $pm_pid, "$what: the postmaster is still the one started");
	note("$what: server log: $_") for grep { /WARNING/ } split /\n/, $log;
	return;
}

# The statement during which the lock was released: it ends with SQLSTATE
# $want, raises no ERROR (FATAL, PANIC) but the expected one, and prints a
# WARNING that is not PostgreSQL's "AbortTransaction while in ... state".
sub released_with_warning
{
	my ($what, $state, $err, $want) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $ok = is($state, $want, "$what ends with SQLSTATE $want");
	my @errors = grep { !/ERROR:  $want:/ } $err =~ /^.*\b(?:ERROR|FATAL|PANIC):.*$/mg;
	$ok = is_deeply(\@errors, [], "$what raises no other ERROR, FATAL or PANIC") && $ok;
	$ok = like($err, qr/WARNING:  (?!01000: Abort(?:Sub)?Transaction while in )/,
		"$what prints a WARNING") && $ok;
	if ($ok) { note("$what: stderr: $err"); }
	else { diag("$what: stderr: $err"); }
	return;
}

# After the fault is over: the lock $name is freed by itself within $bound
# seconds, and another session can take it.  Then, with $s closed, nothing
# is left on the server or in etcd.
sub freed_and_clean
{
	my ($what, $name, $bound, $s) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $t0 = time;
	if (ok(poll(sub { !$etcd->keys("etcd_lock/$name/") }, $bound),
			"$what: after the fault, the key of \"$name\" goes from etcd within $bound s"))
	{
		note(sprintf('%s: key gone after %.1f s', $what, time - $t0));
	}
	else
	{
		diag("$what: keys left: " . join(' ', $etcd->keys("etcd_lock/$name/"))
			  . "; leases in etcd: " . join(' ', $etcd->leases)
			  . "; server leases/locks: " . stats());
	}
	is(sql("SELECT etcd_try_lock('$name', $TTL) IS NOT NULL"), 't',
		"$what: another session can take \"$name\"");
	close_session($s) if $s;
	ok(poll(sub { stats() eq '0/0' }, 2 * $TTL + 5),
		"$what: etcd_lock_stats shows no lease and no lock")
	  or diag("$what: leases/locks: " . stats());
	poll(sub { !$etcd->keys('etcd_lock/') && !$etcd->leases }, 2 * $TTL + 5);
	$etcd->no_leftovers($what, 'etcd_lock/');
	return;
}

# --- sanity: the shim fails requests while the fault file exists ------------------

my $s = session();
fault_on();
my ($out, $err, $state) = run_sql($s, "SELECT etcd_lock('z', $TTL)");
fault_off();
like($state, qr/^(?:58000|08...)$/, 'sanity: with the fault on, etcd_lock() fails (58000 or class 08)')
  or diag("SQLSTATE $state: $err");
like($err, qr/ERROR:/, 'sanity: with an ERROR');
($out, $err, $state) = run_sql($s, "SELECT etcd_lock('z', $TTL)");
like($out, qr{^etcd_lock/z/[0-9a-f]+$}, 'sanity: with the fault off, the same session locks')
  or diag("SQLSTATE $state: $err");
is((run_sql($s, "SELECT etcd_unlock('$out')"))[0], 't', 'sanity: and unlocks');
close_session($s);
no_crash('sanity');
ok(poll(sub { stats() eq '0/0' && !$etcd->keys('etcd_lock/') && !$etcd->leases }, 2 * $TTL + 5),
	'sanity: nothing left');

# Open a session, run @$before, take the transaction lock $key, then run
# $statement with the fault on: its release must end in a WARNING, with
# SQLSTATE $want for the statement, and nothing may crash.  Returns the
# session.
sub under_fault
{
	my ($what, $key, $before, $statement, $want) = @_;
	my $s = session();
	run_sql($s, $_) for @$before;
	my ($out) = run_sql($s, "SELECT etcd_xact_lock('$key', $TTL)");
	like($out, qr{^etcd_lock/$key/[0-9a-f]+$}, "$what the transaction holds $key");
	fault_on();
	my (undef, $err, $state) = run_sql($s, $statement);
	fault_off();
	released_with_warning("$what $statement", $state, $err, $want);
	no_crash($what);
	return $s;
}

# --- (a) COMMIT ------------------------------------------------------------------

$s = under_fault('(a)', 'k1',
	[ 'SET etcd_lock.commit_check = off', 'BEGIN', 'INSERT INTO t VALUES (1)' ],
	'COMMIT', '00000');
is(sql('SELECT count(*) FROM t WHERE id = 1'), '1', '(a) the row is committed');
is((run_sql($s, 'SELECT 1'))[0], '1', '(a) the session still answers');
freed_and_clean('(a)', 'k1', 2 * $TTL + 5, $s);

# --- (b) ROLLBACK ----------------------------------------------------------------

$s = under_fault('(b)', 'k2', [ 'BEGIN', 'INSERT INTO t VALUES (2)' ], 'ROLLBACK', '00000');
is(sql('SELECT count(*) FROM t WHERE id = 2'), '0', '(b) the row is not there');
is((run_sql($s, 'SELECT 1'))[0], '1', '(b) the session still answers');
freed_and_clean('(b)', 'k2', 2 * $TTL + 5, $s);

# --- (c) ROLLBACK TO SAVEPOINT ------------------------------------------------------

$s = under_fault('(c)', 'k3', [ 'BEGIN', 'INSERT INTO t VALUES (3)', 'SAVEPOINT s' ],
	'ROLLBACK TO SAVEPOINT s', '00000');
($out, $err, $state) = run_sql($s, 'COMMIT');
is($state, '00000', '(c) the transaction then commits') or diag("(c) COMMIT: $err");
is(sql('SELECT count(*) FROM t WHERE id = 3'), '1', '(c) its row is committed');
is((run_sql($s, 'SELECT 1'))[0], '1', '(c) the session still answers');
freed_and_clean('(c)', 'k3', 2 * $TTL + 5, $s);

# --- (d) an error aborts the transaction -------------------------------------------

$s = under_fault('(d)', 'k4', ['BEGIN'], 'SELECT 1/0', '22012');
($out, $err, $state) = run_sql($s, 'ROLLBACK');
is($state, '00000', '(d) ROLLBACK succeeds') or diag("(d) ROLLBACK: $err");
is((run_sql($s, 'SELECT 1'))[0], '1', '(d) the session still answers');
freed_and_clean('(d)', 'k4', 2 * $TTL + 5, $s);

# --- (e) session end ---------------------------------------------------------------

$s = session();
my $pid = $s->{pid};
($out) = run_sql($s, "SELECT etcd_lock('k5', $TTL)");
like($out, qr{^etcd_lock/k5/[0-9a-f]+$}, '(e) the session holds k5');
fault_on();
close_session($s);
# the backend's exit processing is over once the process is gone
my $gone = poll(sub { !kill(0, $pid) }, 30);
fault_off();
ok($gone, '(e) the backend exited while the fault was on');
no_crash('(e)');
freed_and_clean('(e)', 'k5', $TTL + 5);

# --- the end -------------------------------------------------------------------------

no_crash('end');
$node->stop;
done_testing();
