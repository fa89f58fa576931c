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

use EtcdLockTest;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $TTL = 5;

# --- the shim ----------------------------------------------------------------

plan skip_all => 'no C compiler (cc) in PATH to build the fault-injection shim'
  unless have_command('cc');
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

my $etcd = EtcdLockTest::Etcd->new(name => 'callback_faults');

# The postmaster (and so every backend and the lease worker) preloads the
# shim.  restart_after_crash = on: on a build that crashes, one case's crash
# does not take the later cases with it; each case looks for a crash or a
# restart in its own part of the log.
my $node = pg_node('callback_faults', $etcd->url, "restart_after_crash = on\n",
	env => { LD_PRELOAD => $shim, ETCD_LOCK_FAULT_FILE => $fault });
$node->safe_psql('postgres', 'CREATE TABLE t (id int PRIMARY KEY)');

my $pm_pid = postmaster_pid($node);
like(slurp_file("/proc/$pm_pid/environ"), qr/(?:^|\0)LD_PRELOAD=\Q$shim\E(?:\0|$)/,
	'the postmaster was started with LD_PRELOAD=fault_shim.so');
like(slurp_file("/proc/$pm_pid/maps"), qr/fault_shim\.so/,
	'the postmaster has the shim mapped');
ok(($ENV{LD_PRELOAD} // '') !~ /fault_shim/, 'psql and etcdctl run without the shim');

# --- helpers -------------------------------------------------------------------

# Run SQL in a session; returns its output, its stderr and the SQLSTATE of
# its last statement (00000 on success), or DEAD if psql went away (the
# backend crashed).
sub try_sql
{
	my ($s, $sql) = @_;
	return ('', 'the session is gone', 'DEAD') if $s->{dead};
	my ($out, $err, $state) = eval { $s->query($sql) };
	if (!defined $out)
	{
		$s->{dead} = 1;
		return ('', $@, 'DEAD');
	}
	return ($out, $err, $state);
}

# A query in a new connection; undef if it fails (never dies).
sub fresh_sql
{
	my ($query) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql('postgres', $query, stdout => \$out, stderr => \$err);
	return $rc == 0 ? $out : undef;
}

# The server's leases and locks in use, as "leases/locks".
sub in_use { return fresh_sql(q{SELECT leases || '/' || locks FROM etcd_lock_stats}) // '?'; }

# The server did not crash or restart since the last check (each part of the
# log is checked once), and answers.
my $log_pos = 0;
sub no_crash
{
	my ($what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	note("$what: server log: $_")
	  for grep { /WARNING/ } split /\n/, slurp_file($node->logfile, $log_pos);
	$log_pos = server_ok($node, $what, log_from => $log_pos);
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
	if (ok(poll_until(sub { !$etcd->keys("etcd_lock/$name/") }, $bound, "the key of $name to go"),
			"$what: after the fault, the key of \"$name\" goes from etcd within $bound s"))
	{
		note(sprintf('%s: key gone after %.1f s', $what, time - $t0));
	}
	else
	{
		diag("$what: keys left: " . join(' ', $etcd->keys("etcd_lock/$name/"))
			  . "; leases in etcd: " . join(' ', $etcd->leases)
			  . "; server leases/locks: " . in_use());
	}
	is(fresh_sql("SELECT etcd_try_lock('$name', $TTL) IS NOT NULL"), 't',
		"$what: another session can take \"$name\"");
	$s->quit if $s;
	ok(poll_until(sub { in_use() eq '0/0' }, 2 * $TTL + 5, 'no lease and no lock in use'),
		"$what: etcd_lock_stats shows no lease and no lock")
	  or diag("$what: leases/locks: " . in_use());
	$etcd->wait_empty('etcd_lock/', 2 * $TTL + 5);
	$etcd->no_leftovers($what, 'etcd_lock/');
	return;
}

# --- sanity: the shim fails requests while the fault file exists ------------------

my $s = session($node);
fault_on();
my ($out, $err, $state) = try_sql($s, "SELECT etcd_lock('z', $TTL)");
fault_off();
like($state, qr/^(?:58000|08...)$/, 'sanity: with the fault on, etcd_lock() fails (58000 or class 08)')
  or diag("SQLSTATE $state: $err");
like($err, qr/ERROR:/, 'sanity: with an ERROR');
($out, $err, $state) = try_sql($s, "SELECT etcd_lock('z', $TTL)");
like($out, qr{^etcd_lock/z/[0-9a-f]+$}, 'sanity: with the fault off, the same session locks')
  or diag("SQLSTATE $state: $err");
is((try_sql($s, "SELECT etcd_unlock('$out')"))[0], 't', 'sanity: and unlocks');
$s->quit;
no_crash('sanity');
ok(poll_until(sub { in_use() eq '0/0' }, 2 * $TTL + 5, 'no lease and no lock in use'),
	'sanity: no lease and no lock in use');
$etcd->wait_empty('etcd_lock/', 2 * $TTL + 5);
$etcd->no_leftovers('sanity', 'etcd_lock/');

# Open a session, run @$before, take the transaction lock $key, then run
# $statement with the fault on: its release must end in a WARNING, with
# SQLSTATE $want for the statement, and nothing may crash.  Returns the
# session.
sub under_fault
{
	my ($what, $key, $before, $statement, $want) = @_;
	my $s = session($node);
	try_sql($s, $_) for @$before;
	my ($out) = try_sql($s, "SELECT etcd_xact_lock('$key', $TTL)");
	like($out, qr{^etcd_lock/$key/[0-9a-f]+$}, "$what the transaction holds $key");
	fault_on();
	my (undef, $err, $state) = try_sql($s, $statement);
	fault_off();
	released_with_warning("$what $statement", $state, $err, $want);
	no_crash($what);
	return $s;
}

# --- (a) COMMIT ------------------------------------------------------------------

$s = under_fault('(a)', 'k1',
	[ 'SET etcd_lock.commit_check = off', 'BEGIN', 'INSERT INTO t VALUES (1)' ],
	'COMMIT', '00000');
is(fresh_sql('SELECT count(*) FROM t WHERE id = 1'), '1', '(a) the row is committed');
is((try_sql($s, 'SELECT 1'))[0], '1', '(a) the session still answers');
freed_and_clean('(a)', 'k1', 2 * $TTL + 5, $s);

# --- (b) ROLLBACK ----------------------------------------------------------------

$s = under_fault('(b)', 'k2', [ 'BEGIN', 'INSERT INTO t VALUES (2)' ], 'ROLLBACK', '00000');
is(fresh_sql('SELECT count(*) FROM t WHERE id = 2'), '0', '(b) the row is not there');
is((try_sql($s, 'SELECT 1'))[0], '1', '(b) the session still answers');
freed_and_clean('(b)', 'k2', 2 * $TTL + 5, $s);

# --- (c) ROLLBACK TO SAVEPOINT ------------------------------------------------------

$s = under_fault('(c)', 'k3', [ 'BEGIN', 'INSERT INTO t VALUES (3)', 'SAVEPOINT s' ],
	'ROLLBACK TO SAVEPOINT s', '00000');
($out, $err, $state) = try_sql($s, 'COMMIT');
is($state, '00000', '(c) the transaction then commits') or diag("(c) COMMIT: $err");
is(fresh_sql('SELECT count(*) FROM t WHERE id = 3'), '1', '(c) its row is committed');
is((try_sql($s, 'SELECT 1'))[0], '1', '(c) the session still answers');
freed_and_clean('(c)', 'k3', 2 * $TTL + 5, $s);

# --- (d) an error aborts the transaction -------------------------------------------

$s = under_fault('(d)', 'k4', ['BEGIN'], 'SELECT 1/0', '22012');
($out, $err, $state) = try_sql($s, 'ROLLBACK');
is($state, '00000', '(d) ROLLBACK succeeds') or diag("(d) ROLLBACK: $err");
is((try_sql($s, 'SELECT 1'))[0], '1', '(d) the session still answers');
freed_and_clean('(d)', 'k4', 2 * $TTL + 5, $s);

# --- (e) session end ---------------------------------------------------------------

$s = session($node);
my $pid = $s->{pid};
($out) = try_sql($s, "SELECT etcd_lock('k5', $TTL)");
like($out, qr{^etcd_lock/k5/[0-9a-f]+$}, '(e) the session holds k5');
fault_on();
$s->quit;
# the backend's exit processing is over once the process is gone
my $gone = poll_until(sub { !kill(0, $pid) }, 30, 'the backend to exit');
fault_off();
ok($gone, '(e) the backend exited while the fault was on');
no_crash('(e)');
freed_and_clean('(e)', 'k5', $TTL + 5);

# --- the end -------------------------------------------------------------------------

no_crash('end');
$node->stop;
done_testing();
