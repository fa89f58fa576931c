# The lease and lock lifecycle at its edges: lease slots after an outage,
# with a full table and with idle sessions; an etcd_unlock_all() that fails
# while the worker races it; a stalled lease worker; the ttl maximum and a
# terminated session's day-long lease; and a crash restart.
#
#   Node "lc_small" (max_locks = 16, its own etcd):
#     (9)  a full lock table: 53200, and the attempt leaves no lease behind
#     (10) 16 idle sessions (locked, then unlocked) leave room for a 17th
#     (4)  16 sessions end during a 7 s etcd freeze; right after it a new
#          session locks at once, then nothing is left
#   Node "lc_slow" (endpoints: etcd, then three that never answer):
#     (5)  etcd_unlock_all() during a 3 s etcd pause (so it takes 4 s: etcd,
#          then the three), while another session's activity keeps the
#          worker awake: whatever the call returns, the session's rows then
#          agree with etcd and keep other sessions out, and it locks again
#   Node "lc_main" (defaults, restart_after_crash on, its own etcd):
#     (8)  ttl above 86400 is 22023; a ttl-86400 lock of a session terminated
#          while etcd is paused is gone soon after etcd resumes
#     (7)  a stalled (SIGSTOPped) lease worker: the lock shows 'lost', its
#          token is 40L01, re-locking does not re-enter the dead hold
#     (c)  kill -9 of a holder: after the restart the key and lease go at once
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use IO::Socket::INET;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $SETTLE = 15;    # bound for "once settled" polls, in seconds
my $AT_ONCE = 3;    # "at once": request_timeout (1 s) plus a margin

# ---------------------------------------------------------------------------
# Helpers (this file's own)
# ---------------------------------------------------------------------------

# One statement, waited for at most $limit seconds (30): (stdout, stderr,
# seconds).  One that has not ended by then is a failure, and is cancelled
# so that the session can go on.
sub bounded_sql
{
	my ($s, $sql, $limit) = @_;
	$limit //= 30;
	$s->start($sql);
	return bounded_finish($s, $sql, $limit);
}

sub bounded_finish
{
	my ($s, $sql, $limit) = @_;
	my ($done, $out, $err, undef, $secs) = $s->finish($limit);
	return ($out, $err, $secs) if $done;
	fail("statement ended within $limit s: $sql");
	$s->cancel;
	(undef, $out, $err, undef, $secs) = $s->finish(10);
	return ($out // '', $err // '', $secs // $limit);
}

# Once settled: no lease renewed, no lock, no lease being revoked.
sub settled
{
	my ($node, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$node->poll_query_until('postgres',
		'SELECT leases = 0 AND locks = 0 AND revoking = 0 FROM etcd_lock_stats');
	my $st = stats($node);
	is($st->{leases}, 0, "$what: etcd_lock_stats.leases = 0");
	is($st->{locks}, 0, "$what: etcd_lock_stats.locks = 0");
	is($st->{revoking}, 0, "$what: etcd_lock_stats.revoking = 0");
	return;
}

# Once settled: no key and no lease in etcd.
sub etcd_clean
{
	my ($etcd, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	$etcd->wait_empty('', $SETTLE);
	$etcd->no_leftovers($what);
	return;
}

sub has_key
{
	my ($etcd, $key) = @_;
	return scalar grep { $_ eq $key } $etcd->keys($key);
}

sub has_lease
{
	my ($etcd, $lease) = @_;
	return scalar grep { $_ eq $lease } $etcd->leases;
}

# Whether every pid given has left pg_stat_activity.
sub backends_gone
{
	my ($node, @pids) = @_;
	my $list = join ',', @pids;
	return $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE pid IN ($list)") eq '0';
}

# A loopback TCP listener that never accepts: the kernel completes the
# handshake and takes the request, and no answer ever comes.
my @silent;
sub silent_endpoint
{
	my $sock = IO::Socket::INET->new(
		LocalAddr => '127.0.0.1',
		LocalPort => 0,
		Listen => 1024,
		Proto => 'tcp',
		ReuseAddr => 1) or die "listen: $!";
	push @silent, $sock;
	return 'http://127.0.0.1:' . $sock->sockport;
}

# a stopped worker must not outlive a failed test: the node could not stop
my $stopped_worker;
END
{
	kill 'CONT', $stopped_worker if $stopped_worker;
}

# ===========================================================================
# Node lc_small: max_locks = 16 (the minimum)
# ===========================================================================
my $etcd_s = EtcdLockTest::Etcd->new(name => 'lc_small_etcd');
my $small = pg_node('lc_small', $etcd_s->url,
	"etcd_lock.max_locks = 16\nmax_connections = 40\n");
is($small->safe_psql('postgres', 'SHOW etcd_lock.max_locks'), '16', 'lc_small: max_locks is 16');

# ---------------------------------------------------------------------------
# (9) the table is full: 16 sessions hold a lock each, on a lease each
# ---------------------------------------------------------------------------
my @holders = map { session($small) } 1 .. 16;
my @hh;
for my $i (0 .. 15)
{
	my ($h) = bounded_sql($holders[$i], "SELECT etcd_lock('full-$i', 10)");
	push @hh, $h;
}
is(scalar(grep { m{^etcd_lock/full-\d+/[0-9a-f]+$} } @hh), 16, 'full table: 16 sessions hold a lock each');
is(stats($small)->{leases}, 16, 'full table: 16 leases renewed');
is(stats($small)->{locks}, 16, 'full table: 16 locks');
{
	my $what = 'full table';
	my @etcd_leases0 = sort $etcd_s->leases;
	my $st0 = stats($small);
	my $n = session($small);
	my ($out, $err, $elapsed) = bounded_sql($n, q{SELECT etcd_lock('one-more', 5)});
	note "$what: etcd_lock('one-more', 5) said: $err";
	is($out, '', "$what: no handle");
	is(sqlstate($err), '53200', "$what: etcd_lock fails with SQLSTATE 53200");
	like($err, qr/too many etcd (leases|locks) in use/, "$what: the message says the table is full");
	cmp_ok($elapsed, '<', $AT_ONCE, sprintf('%s: at once (%.2f s)', $what, $elapsed));
	is_deeply([ sort $etcd_s->leases ], \@etcd_leases0, "$what: the attempt left no lease in etcd");
	is_deeply([ $etcd_s->keys('etcd_lock/one-more/') ], [], "$what: and no key");
	my $st1 = stats($small);
	is($st1->{leases}, $st0->{leases}, "$what: etcd_lock_stats.leases unchanged ($st0->{leases})");
	is($st1->{locks}, $st0->{locks}, "$what: etcd_lock_stats.locks unchanged ($st0->{locks})");
	is($small->safe_psql('postgres', "SELECT count(*) FROM etcd_locks WHERE pid = $n->{pid}"), '0',
		"$what: no etcd_locks row for the session that failed");
	server_ok($small, $what);
	$n->quit;
}

# ---------------------------------------------------------------------------
# (10) the same 16 sessions unlock and stay connected, holding nothing
# ---------------------------------------------------------------------------
{
	my $what = 'idle sessions';
	my $unlocked = 0;
	for my $i (0 .. 15)
	{
		my ($out) = bounded_sql($holders[$i], "SELECT etcd_unlock('$hh[$i]')");
		$unlocked++ if $out eq 't';
	}
	is($unlocked, 16, "$what: 16 sessions unlocked (and stay connected)");
	is($small->safe_psql('postgres', 'SELECT count(*) FROM etcd_locks'), '0',
		"$what: no lock is held");
	my $n17 = session($small);
	my ($out, $err, $elapsed) = bounded_sql($n17, q{SELECT etcd_lock('n17', 5)});
	note "$what: etcd_lock('n17', 5) said: $err" if $err;
	like($out, qr{^etcd_lock/n17/[0-9a-f]+$}, "$what: a 17th session's etcd_lock('n17', 5) succeeds")
	  or diag "stderr: $err";
	is(sqlstate($err), '', "$what: no error (got: " . (sqlstate($err) || 'none') . ')');
	cmp_ok($elapsed, '<', $AT_ONCE, sprintf('%s: at once (%.2f s)', $what, $elapsed));
	if ($out =~ m{^etcd_lock/})
	{
		ok(has_key($etcd_s, $out), "$what: its key is in etcd");
		is((bounded_sql($n17, "SELECT etcd_unlock('$out')"))[0], 't', "$what: it unlocks");
	}
	$n17->quit;
	$_->quit for @holders;
	settled($small, "$what, all sessions gone");
	etcd_clean($etcd_s, "$what, all sessions gone");
	server_ok($small, $what);
}

# ---------------------------------------------------------------------------
# (4) 16 holders end during a 7 s etcd freeze; then a new session locks
# ---------------------------------------------------------------------------
{
	my $what = 'outage slot leak';
	my @s = map { session($small) } 1 .. 16;
	my $taken = 0;
	for my $i (0 .. 15)
	{
		my ($h) = bounded_sql($s[$i], "SELECT etcd_lock('leak-$i', 5)");
		$taken++ if $h =~ m{^etcd_lock/leak-$i/[0-9a-f]+$};
	}
	is($taken, 16, "$what: 16 sessions hold a ttl-5 lock each");
	is(stats($small)->{leases}, 16, "$what: 16 leases in use");
	my $x = session($small);    # connected now; holds nothing yet
	my @pids = map { $_->{pid} } @s;

	# Half of the sessions end at once, while their leases are still
	# believed alive; the other half once the worker has given their leases
	# up as lost (unrenewed for a ttl), still inside the freeze.
	my @early = @s[ 0 .. 7 ];
	my @late = @s[ 8 .. 15 ];
	my $late_pids = join ',', map { $_->{pid} } @late;
	$etcd_s->pause;
	my $t_pause = time;
	$_->quit for @early;
	my $lost = poll_until(sub {
			$small->safe_psql('postgres',
				"SELECT count(*) FROM etcd_locks WHERE pid IN ($late_pids) AND state = 'lost'") eq '8'
		}, 5.5 - (time - $t_pause), 'the late sessions\' locks to show lost');
	note sprintf("%s: %s %.2f s into the freeze", $what,
		$lost ? "the other 8 sessions' locks show 'lost'" : "the other 8 sessions' locks do not show 'lost'",
		time - $t_pause);
	$_->quit for @late;
	ok(poll_until(sub { backends_gone($small, @pids) }, 6.9 - (time - $t_pause), 'the backends to end'),
		"$what: the 16 sessions ended during the freeze");
	note sprintf('%s: the 16 backends were gone %.2f s into the freeze', $what, time - $t_pause);
	my $left = 7 - (time - $t_pause);
	Time::HiRes::sleep($left) if $left > 0;    # the freeze lasts 7 s
	$etcd_s->resume;

	my ($out, $err, $elapsed) = bounded_sql($x, q{SELECT etcd_lock('x', 5)});
	note "$what: etcd_lock('x', 5) right after the resume said: $err" if $err;
	like($out, qr{^etcd_lock/x/[0-9a-f]+$}, "$what: right after the resume, a new session's etcd_lock('x', 5) succeeds")
	  or diag "stderr: $err\netcd_lock_stats right after: "
	  . $small->safe_psql('postgres', 'SELECT row_to_json(s) FROM etcd_lock_stats s');
	isnt(sqlstate($err), '53200', "$what: not 53200 (too many etcd leases in use)");
	is(sqlstate($err), '', "$what: no error at all");
	cmp_ok($elapsed, '<', $AT_ONCE, sprintf('%s: at once (%.2f s)', $what, $elapsed));
	if ($out =~ m{^etcd_lock/})
	{
		ok(has_key($etcd_s, $out), "$what: its key is in etcd");
		is((bounded_sql($x, "SELECT etcd_unlock('$out')"))[0], 't', "$what: it unlocks");
	}
	$x->quit;
	settled($small, $what);
	etcd_clean($etcd_s, $what);
	server_ok($small, $what);
}
$small->stop;

# ===========================================================================
# Node lc_slow: etcd first, then three endpoints that never answer
# ===========================================================================
{
	my $what = 'unlock_all vs worker';
	my $etcd_c = EtcdLockTest::Etcd->new(name => 'lc_slow_etcd');
	my @slow = map { silent_endpoint() } 1 .. 3;
	my $slow = pg_node('lc_slow', join(',', $etcd_c->url, @slow));

	my $sa = session($slow);
	my $sb = session($slow);
	my %h;
	($h{u1}) = bounded_sql($sa, q{SELECT etcd_lock('u1', 60)});
	($h{u2}) = bounded_sql($sa, q{SELECT etcd_lock('u2', 60)});
	like($h{$_}, qr{^etcd_lock/$_/[0-9a-f]+$}, "$what: A holds $_") for qw(u1 u2);
	is(lease_of($h{u1}), lease_of($h{u2}), "$what: both on one lease");

	# etcd frozen for 3 s: the call meets it, then the silent endpoints
	$etcd_c->pause;
	my $t_pause = time;
	$sa->start('SELECT etcd_unlock_all()');
	my $left = 3 - (time - $t_pause);
	Time::HiRes::sleep($left) if $left > 0;    # the pause lasts 3 s
	$etcd_c->resume;
	# another session is busy meanwhile, as on any server: its new lease
	# wakes the worker while A's call still goes through the silent endpoints
	my ($wake) = bounded_sql($sb, q{SELECT etcd_unlock(etcd_lock('wake', 5))});
	is($wake, 't', "$what: B locks and unlocks another name after the resume");
	my ($done, $out, $err, undef, $elapsed) = $sa->finish(20);
	ok($done, sprintf('%s: etcd_unlock_all() returned (%.2f s)', $what, $elapsed // 20));
	unless ($done)
	{
		$sa->cancel;    # so that the session can go on
		(undef, $out, $err) = $sa->finish(10);
		($out, $err) = ($out // '', $err // '');
	}
	my $code = sqlstate($err);
	note "$what: etcd_unlock_all() returned '$out', SQLSTATE " . ($code || 'none');
	note "  $_" for grep { /ERROR|WARNING|DETAIL/ } split /\n/, $err;
	ok(($code eq '' && $out =~ /^\d+$/) || $code =~ /^08/,
		"$what: it either succeeded or failed with a class-08 SQLSTATE ($code)")
	  or diag "stdout: $out\nstderr: $err";

	# A's rows must agree with etcd, and exclude B, from now on
	my $rows = sub {
		my %r;
		for (split /\n/, $slow->safe_psql('postgres',
				"SELECT key, handle, state FROM etcd_locks WHERE pid = $sa->{pid}"))
		{
			my ($k, $hd, $st) = split /\|/;
			$r{$k} = [ $hd, $st ];
		}
		return \%r;
	};
	my ($samples, $bad_key, $bad_excl) = (0, 0, 0);
	my %told;    # diag each kind of disagreement once per name
	# sample every 0.3 s, for at most 4 s or until A holds nothing
	poll_until(sub {
		$samples++;
		my $r0 = $rows->();
		my %inetcd = map { $_ => 1 } $etcd_c->keys('etcd_lock/u');
		my %b_got;
		for my $k (sort grep { $r0->{$_}[1] eq 'held' } keys %$r0)
		{
			my ($bh) = bounded_sql($sb, "SELECT etcd_try_lock('$k', 5)");
			$b_got{$k} = $bh if $bh ne '';
		}
		my $r1 = $rows->();
		for my $k (sort keys %$r0)
		{
			my $held = $r0->{$k}[1] eq 'held' && $r1->{$k}
			  && $r1->{$k}[1] eq 'held' && $r1->{$k}[0] eq $r0->{$k}[0];
			next unless $held;
			if (!$inetcd{ $r0->{$k}[0] })
			{
				$bad_key++;
				diag "$what: A's row says '$k' is held with $r0->{$k}[0], which is not in etcd"
				  unless $told{"key $k"}++;
			}
			if ($b_got{$k})
			{
				$bad_excl++;
				diag "$what: B took '$k' ($b_got{$k}) while A's row says held"
				  unless $told{"excl $k"}++;
			}
		}
		bounded_sql($sb, "SELECT etcd_unlock('$_')") for values %b_got;
		return !grep { $_->[1] eq 'held' } values %{ $rows->() };
	}, 4, "$what: A to hold nothing", 0.3);
	note "$what: $samples samples of A's rows; $bad_key disagreed with etcd, $bad_excl let B in";
	is($bad_key, 0, "$what: A's rows show 'held' only for keys that are in etcd");
	is($bad_excl, 0, "$what: while A shows 'held', B's etcd_try_lock returns NULL");

	# A can lock again, and what it gets is real
	my ($h2, $err2) = bounded_sql($sa, q{SELECT etcd_lock('u1', 60)});
	note "$what: A's etcd_lock('u1', 60) said: $err2" if $err2;
	isnt(sqlstate($err2), '40L01', "$what: A's etcd_lock('u1', 60) is not 40L01");
	like($h2, qr{^etcd_lock/u1/[0-9a-f]+$}, "$what: A's etcd_lock('u1', 60) returns a handle")
	  or diag "stderr: $err2";
	ok($h2 ne '' && has_key($etcd_c, $h2), "$what: that handle is a key in etcd");
	is($slow->safe_psql('postgres',
			"SELECT state FROM etcd_locks WHERE pid = $sa->{pid} AND key = 'u1' AND handle = '$h2'"),
		'held', "$what: A's row for u1 shows that handle held");
	my ($b3) = bounded_sql($sb, q{SELECT etcd_try_lock('u1', 5) IS NULL});
	is($b3, 't', "$what: B cannot take u1 from A");

	bounded_sql($sa, 'SELECT etcd_unlock_all()');
	$sa->quit;
	$sb->quit;
	settled($slow, $what);
	etcd_clean($etcd_c, $what);
	server_ok($slow, $what);
	$slow->stop;
	close $_ for @silent;
}

# ===========================================================================
# Node lc_main: defaults; restart_after_crash on for (c)
# ===========================================================================
my $etcd = EtcdLockTest::Etcd->new(name => 'lc_main_etcd');
my $node = pg_node('lc_main', $etcd->url, "restart_after_crash = on\n");
my $pm = postmaster_pid($node);

# ---------------------------------------------------------------------------
# (8) the ttl maximum; a day-long lease of a session terminated during a pause
# ---------------------------------------------------------------------------
{
	my $what = 'ttl maximum';
	my $s = session($node);
	my @leases0 = sort $etcd->leases;
	my $st0 = stats($node);
	my ($out, $err) = bounded_sql($s, q{SELECT etcd_lock('big', 2147483647)});
	note "$what: etcd_lock('big', 2147483647) said: " . ($err || "nothing, returned $out");
	is(sqlstate($err), '22023', "$what: etcd_lock('big', 2147483647) fails with SQLSTATE 22023");
	is($out, '', "$what: no handle");
	is_deeply([ $etcd->keys('etcd_lock/big/') ], [], "$what: no key in etcd");
	is_deeply([ sort $etcd->leases ], \@leases0, "$what: no lease granted in etcd");
	my $st1 = stats($node);
	is($st1->{leases}, $st0->{leases}, "$what: etcd_lock_stats.leases unchanged");
	is($st1->{locks}, $st0->{locks}, "$what: etcd_lock_stats.locks unchanged");
	bounded_sql($s, 'SELECT etcd_unlock_all()') if $out ne '';    # clean up after a wrong success

	$what = 'ttl 86400';
	my ($h) = bounded_sql($s, q{SELECT etcd_lock('big', 86400)});
	like($h, qr{^etcd_lock/big/[0-9a-f]+$}, "$what: etcd_lock('big', 86400) works");
	my $lease = lease_of($h) // '';
	ok(has_key($etcd, $h), "$what: its key is in etcd");
	like($etcd->etcdctl('lease', 'timetolive', $lease), qr/granted with TTL\(86400s\)/,
		"$what: etcd granted a 86400 s lease");

	$etcd->pause;
	is($node->safe_psql('postgres', "SELECT pg_terminate_backend($s->{pid})"), 't',
		"$what: its session is terminated while etcd is paused");
	ok(poll_until(sub { backends_gone($node, $s->{pid}) }, 8, 'the backend to end'),
		"$what: the backend ended");
	$etcd->resume;
	my $t_resume = time;
	$s->quit;
	ok(poll_until(sub { !has_key($etcd, $h) }, 5, 'the key to go'),
		"$what: the key is gone from etcd within 5 s of the resume");
	ok(poll_until(sub { !has_lease($etcd, $lease) }, 5, 'the lease to go'),
		"$what: the lease is gone from etcd");
	note sprintf('%s: cleaned up %.2f s after the resume', $what, time - $t_resume);
	settled($node, $what);
	etcd_clean($etcd, $what);
	server_ok($node, $what);
}

# ---------------------------------------------------------------------------
# (7) a stalled lease worker
# ---------------------------------------------------------------------------
{
	my $what = 'stalled worker';
	my $w = session($node);
	my ($hw) = bounded_sql($w, q{SELECT etcd_lock('w', 3)});
	like($hw, qr{^etcd_lock/w/[0-9a-f]+$}, "$what: W holds w (ttl 3)");
	my ($tok) = bounded_sql($w, "SELECT etcd_lock_token('$hw')");
	like($tok, qr/^\d+$/, "$what: its token is $tok");

	my ($wpid) = worker_pids($node);
	ok($wpid, "$what: the worker's pid is " . ($wpid // 'unknown'));
	SKIP:
	{
		skip "$what: no worker pid", 9 unless $wpid;
		# a stop inside its LWLock would hang every backend: then retry
		for my $try (1 .. 3)
		{
			kill 'STOP', $wpid;
			$stopped_worker = $wpid;
			poll_until(sub { proc_state($wpid) eq 'T' }, 5, 'the worker to stop');
			my $to = 0;
			$node->psql('postgres', 'SELECT count(*) FROM etcd_locks',
				timeout => 5, timed_out => \$to);
			last unless $to;
			diag "$what: the worker stopped holding the lock table; retrying";
			kill 'CONT', $wpid;
			usleep(10_000);
		}
		is(proc_state($wpid), 'T', "$what: the worker is stopped");
		my $t_stop = time;

		ok( poll_until(sub {
					$node->safe_psql('postgres', "SELECT state FROM etcd_locks WHERE handle = '$hw'") eq 'lost'
				}, 10, "$what: the lock to show 'lost'"),
			"$what: etcd_locks shows 'lost' within 10 s")
		  or diag "etcd_lock_stats: "
		  . $node->safe_psql('postgres', 'SELECT row_to_json(s) FROM etcd_lock_stats s');
		note sprintf("%s: after %.1f s, the row says '%s'", $what, time - $t_stop,
			$node->safe_psql('postgres', "SELECT state FROM etcd_locks WHERE handle = '$hw'"));
		ok(poll_until(sub { !has_key($etcd, $hw) }, 8, 'the key to go'),
			"$what: etcd expired the unrenewed lease and its key (precondition)");

		my ($out, $err) = bounded_sql($w, "SELECT etcd_lock_token('$hw')");
		note "$what: etcd_lock_token said: " . ($err || "nothing, returned $out");
		is(sqlstate($err), '40L01', "$what: etcd_lock_token(handle) fails with SQLSTATE 40L01");

		my ($h2, $err2) = bounded_sql($w, q{SELECT etcd_lock('w', 3)});
		my $c2 = sqlstate($err2);
		note "$what: re-locking w said: " . ($err2 || "nothing, returned $h2");
		if ($c2 ne '')
		{
			unlike($c2, qr/^XX/, "$what: re-locking w fails, with a proper SQLSTATE ($c2)");
		}
		else
		{
			like($h2, qr{^etcd_lock/w/[0-9a-f]+$}, "$what: re-locking w returns a handle");
			isnt($h2, $hw, "$what: re-locking w takes a new key, not the dead one");
		}
		is($node->safe_psql('postgres',
				"SELECT count(*) FROM etcd_locks WHERE handle = '$hw' AND count >= 2"),
			'0', "$what: the dead hold's count never became 2");

		my ($u, $uerr) = bounded_sql($w, "SELECT etcd_unlock('$hw')");
		note "$what: etcd_unlock(old handle) said: $uerr" if $uerr;
		is($u, 'f', "$what: etcd_unlock(old handle) returns false");
		like($uerr, qr/WARNING:/, "$what: with a WARNING");

		kill 'CONT', $wpid;
		$stopped_worker = undef;
	}
	bounded_sql($w, 'SELECT etcd_unlock_all()');
	$w->quit;
	settled($node, $what);
	etcd_clean($etcd, $what);
	my ($wpid2) = worker_pids($node);
	is($wpid2, $wpid, "$what: the same worker runs on") if $wpid;
	server_ok($node, $what);
}

# ---------------------------------------------------------------------------
# (c) kill -9 of a holder: the postmaster restarts every backend
# ---------------------------------------------------------------------------
{
	my $what = 'crash restart';
	my $s = session($node);
	my ($h) = bounded_sql($s, q{SELECT etcd_lock('c', 30)});
	like($h, qr{^etcd_lock/c/[0-9a-f]+$}, "$what: a session holds c (ttl 30)");
	my $lease = lease_of($h) // '';
	ok(has_key($etcd, $h), "$what: its key is in etcd");
	my $off = -s $node->logfile;
	ok(kill('KILL', $s->{pid}), "$what: SIGKILL sent to backend $s->{pid}");
	$s->quit;
	ok($node->wait_for_log(qr/all server processes terminated; reinitializing/, $off),
		"$what: the postmaster restarts the backends");
	ok($node->poll_query_until('postgres', 'SELECT 1', '1'), "$what: the server answers again");
	my $t_up = time;
	ok(poll_until(sub { !has_key($etcd, $h) }, 2 - (time - $t_up), 'the key to go'),
		"$what: the key is gone from etcd within 2 s of the restart");
	ok(poll_until(sub { !has_lease($etcd, $lease) }, 2 - (time - $t_up), 'the lease to go'),
		"$what: its lease is gone from etcd within 2 s of the restart");
	note sprintf('%s: key %s %.2f s after the server answered again', $what,
		has_key($etcd, $h) ? 'still there' : 'gone', time - $t_up);
	is(scalar($etcd->leases), 0, "$what: no lease left in etcd");
	my $log = slurp_file($node->logfile, $off);
	my @killed = $log =~ /server process \(PID (\d+)\) was terminated by signal/g;
	is_deeply(\@killed, [ $s->{pid} ], "$what: only the killed backend died of a signal");
	unlike(slurp_file($node->logfile), qr/PANIC/, "$what: no PANIC");
	is(postmaster_pid($node), $pm, "$what: the postmaster is the same ($pm)");
	my $st = stats($node);
	is($st->{leases}, 0, "$what: etcd_lock_stats.leases = 0 after the restart");
	is($st->{locks}, 0, "$what: etcd_lock_stats.locks = 0 after the restart");
}

$node->stop;
done_testing();
