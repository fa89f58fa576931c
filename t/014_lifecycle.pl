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

use EtcdServer;
use IO::Socket::INET;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $SETTLE = 15;    # bound for "once settled" polls, in seconds
my $AT_ONCE = 3;    # "at once": request_timeout (1 s) plus a margin

# ---------------------------------------------------------------------------
# Helpers (this file's own)
# ---------------------------------------------------------------------------

# Poll $cond every 50 ms for at most $bound seconds; true if it came true.
sub wait_for
{
	my ($cond, $bound) = @_;
	my $end = time + $bound;
	while (time < $end)
	{
		return 1 if $cond->();
		usleep(50_000);
	}
	return $cond->() ? 1 : 0;
}

# A background psql that goes on after errors and prints SQLSTATEs; its
# timeout is per query, since this file runs for minutes.
sub session
{
	my ($node) = @_;
	my $bg = $node->background_psql('postgres', on_error_stop => 0);
	$bg->set_query_timer_restart;
	$bg->query_safe('\set VERBOSITY verbose');
	my $pid = $bg->query_safe('SELECT pg_backend_pid()');
	return { bg => $bg, pid => $pid, node => $node, n => 0 };
}

# Send one statement without waiting for its end; returns once psql has
# read it (the echo before it came back).
sub start_sql
{
	my ($s, $sql) = @_;
	my $bg = $s->{bg};
	my $n = ++$s->{n};
	$bg->{stdout} = '';
	$bg->{stderr} = '';
	$s->{marker} = "lc-stmt-$n-end";
	$s->{t0} = time;
	$bg->{timeout}->start;    # its IPC::Run timer, per statement
	$bg->{stdin} .= "\\echo lc-stmt-$n-start\n$sql;\n\\echo $s->{marker}\n\\warn $s->{marker}\n";
	# keep what follows the start marker: a quick statement's output may
	# arrive with it
	my $end = time + 60;
	until ($bg->{stdout} =~ s/^.*?lc-stmt-$n-start\n//s)
	{
		die "psql did not start the statement: $sql" if time > $end || !$bg->{run}->pumpable;
		$bg->{run}->pump_nb;
		usleep(2_000);
	}
	return;
}

# Wait at most $limit seconds for the statement sent by start_sql; returns
# (ended, stdout, stderr, seconds since it was sent).  One that has not
# ended is cancelled, so the session can go on.
sub finish_sql
{
	my ($s, $limit) = @_;
	my $bg = $s->{bg};
	my $m = $s->{marker};
	my $end = time + $limit;
	my $done = 0;
	while (1)
	{
		$bg->{run}->pump_nb;
		if ($bg->{stdout} =~ /$m\n/ && $bg->{stderr} =~ /$m\n/)
		{
			$done = 1;
			last;
		}
		last if time > $end || !$bg->{run}->pumpable;
		usleep(10_000);
	}
	my $elapsed = time - $s->{t0};
	if (!$done && $bg->{run}->pumpable)
	{
		diag "statement still running after $limit s: cancelling it";
		$s->{node}->safe_psql('postgres', "SELECT pg_cancel_backend($s->{pid})");
		my $end2 = time + 10;
		while (time < $end2)
		{
			$bg->{run}->pump_nb;
			last if $bg->{stdout} =~ /$m\n/ && $bg->{stderr} =~ /$m\n/;
			usleep(10_000);
		}
	}
	my ($out, $err) = ($bg->{stdout}, $bg->{stderr});
	$bg->{stdout} = '';
	$bg->{stderr} = '';
	$out =~ s/$m\n//;
	$err =~ s/$m\n//;
	chomp $out;
	return ($done, $out, $err, $elapsed);
}

# One statement, waited for: (stdout, stderr, seconds).
sub run_sql
{
	my ($s, $sql, $limit) = @_;
	start_sql($s, $sql);
	my ($done, $out, $err, $elapsed) = finish_sql($s, $limit // 30);
	fail("statement ended within " . ($limit // 30) . " s: $sql") unless $done;
	return ($out, $err, $elapsed);
}

# The SQLSTATE of the first ERROR in verbose psql output, or ''.
sub sqlstate
{
	my ($err) = @_;
	return $err =~ /ERROR:  ([0-9A-Z]{5}):/ ? $1 : '';
}

sub quit_session
{
	my ($s) = @_;
	my $bg = $s->{bg};
	$bg->{stdin} .= "\\q\n";
	eval { $bg->{run}->finish; };
	return;
}

# etcd_lock_stats as a hash; a column this build lacks is simply absent.
sub stats
{
	my ($node) = @_;
	return decode_json($node->safe_psql('postgres',
			'SELECT row_to_json(s) FROM etcd_lock_stats s'));
}

sub postmaster_pid
{
	my ($node) = @_;
	open my $fh, '<', $node->data_dir . '/postmaster.pid' or return 0;
	my $pid = <$fh>;
	close $fh;
	chomp $pid;
	return $pid;
}

# The server answers, nothing crashed, the postmaster is the one it was.
sub server_ok
{
	my ($node, $pm, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	is($node->safe_psql('postgres', 'SELECT 1'), '1', "$what: the server answers");
	my $log = slurp_file($node->logfile);
	unlike($log, qr/terminated by signal|PANIC/, "$what: no process crashed, no PANIC");
	is(postmaster_pid($node), $pm, "$what: the postmaster is the same ($pm)");
	return;
}

# Once settled: no lease renewed, no lock, no lease being revoked.
sub settled
{
	my ($node, $what) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	EtcdServer::poll_sql($node, 'SELECT leases = 0 AND locks = 0 FROM etcd_lock_stats', 't',
		$SETTLE);
	my $st = stats($node);
	is($st->{leases}, 0, "$what: etcd_lock_stats.leases = 0");
	is($st->{locks}, 0, "$what: etcd_lock_stats.locks = 0");
	if (exists $st->{revoking})
	{
		EtcdServer::poll_sql($node, 'SELECT revoking FROM etcd_lock_stats', '0', $SETTLE);
		is(stats($node)->{revoking}, 0, "$what: etcd_lock_stats.revoking = 0");
	}
	else
	{
		fail("$what: etcd_lock_stats.revoking = 0");
		diag 'etcd_lock_stats has no column revoking on this build';
	}
	return;
}

# Once settled: no key and no lease in etcd.
sub etcd_clean
{
	my ($etcd, $what, $bound) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	wait_for(sub { scalar($etcd->keys('')) == 0 && scalar($etcd->leases) == 0 },
		$bound // $SETTLE);
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

# The lease worker's pid: from pg_stat_activity, else etcd_lock_stats's
# worker_pid, else the postmaster's child titled "etcd_lock lease worker"
# (checked by parent pid: other tests' servers run workers too).
sub worker_pid
{
	my ($node) = @_;
	my $pid = $node->safe_psql('postgres',
		q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'etcd_lock lease worker'});
	return ($pid, 'pg_stat_activity') if $pid =~ /^\d+$/;
	my $st = stats($node);
	return ($st->{worker_pid}, 'etcd_lock_stats.worker_pid')
	  if defined $st->{worker_pid} && $st->{worker_pid} > 0;
	my $pm = postmaster_pid($node);
	opendir my $d, '/proc' or die "/proc: $!";
	for my $p (grep { /^\d+$/ } readdir $d)
	{
		open my $fh, '<', "/proc/$p/cmdline" or next;
		my $cmd = do { local $/; <$fh> } // '';
		close $fh;
		next unless $cmd =~ /etcd_lock lease worker/;
		open my $sf, '<', "/proc/$p/status" or next;
		my ($ppid) = map { /^PPid:\s+(\d+)/ ? $1 : () } <$sf>;
		close $sf;
		return ($p, '/proc') if ($ppid // 0) == $pm;
	}
	return (undef, 'not found');
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
my $etcd_s = EtcdServer->new(name => 'lc_small_etcd');
my $small = EtcdServer::pg_node('lc_small', $etcd_s->url,
	"etcd_lock.max_locks = 16\nmax_connections = 40\n");
my $small_pm = postmaster_pid($small);
is($small->safe_psql('postgres', 'SHOW etcd_lock.max_locks'), '16', 'lc_small: max_locks is 16');

# ---------------------------------------------------------------------------
# (9) the table is full: 16 sessions hold a lock each, on a lease each
# ---------------------------------------------------------------------------
my @holders = map { session($small) } 1 .. 16;
my @hh;
for my $i (0 .. 15)
{
	my ($h) = run_sql($holders[$i], "SELECT etcd_lock('full-$i', 10)");
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
	my ($out, $err, $elapsed) = run_sql($n, q{SELECT etcd_lock('one-more', 5)});
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
	server_ok($small, $small_pm, $what);
	quit_session($n);
}

# ---------------------------------------------------------------------------
# (10) the same 16 sessions unlock and stay connected, holding nothing
# ---------------------------------------------------------------------------
{
	my $what = 'idle sessions';
	my $unlocked = 0;
	for my $i (0 .. 15)
	{
		my ($out) = run_sql($holders[$i], "SELECT etcd_unlock('$hh[$i]')");
		$unlocked++ if $out eq 't';
	}
	is($unlocked, 16, "$what: 16 sessions unlocked (and stay connected)");
	is($small->safe_psql('postgres', 'SELECT count(*) FROM etcd_locks'), '0',
		"$what: no lock is held");
	my $n17 = session($small);
	my ($out, $err, $elapsed) = run_sql($n17, q{SELECT etcd_lock('n17', 5)});
	note "$what: etcd_lock('n17', 5) said: $err" if $err;
	like($out, qr{^etcd_lock/n17/[0-9a-f]+$}, "$what: a 17th session's etcd_lock('n17', 5) succeeds")
	  or diag "stderr: $err";
	is(sqlstate($err), '', "$what: no error (got: " . (sqlstate($err) || 'none') . ')');
	cmp_ok($elapsed, '<', $AT_ONCE, sprintf('%s: at once (%.2f s)', $what, $elapsed));
	if ($out =~ m{^etcd_lock/})
	{
		ok(has_key($etcd_s, $out), "$what: its key is in etcd");
		is((run_sql($n17, "SELECT etcd_unlock('$out')"))[0], 't', "$what: it unlocks");
	}
	quit_session($n17);
	quit_session($_) for @holders;
	settled($small, "$what, all sessions gone");
	etcd_clean($etcd_s, "$what, all sessions gone");
	server_ok($small, $small_pm, $what);
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
		my ($h) = run_sql($s[$i], "SELECT etcd_lock('leak-$i', 5)");
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
	quit_session($_) for @early;
	my $lost = wait_for(sub {
			$small->safe_psql('postgres',
				"SELECT count(*) FROM etcd_locks WHERE pid IN ($late_pids) AND state = 'lost'") eq '8'
		}, 5.5 - (time - $t_pause));
	note sprintf("%s: %s %.2f s into the freeze", $what,
		$lost ? "the other 8 sessions' locks show 'lost'" : "the other 8 sessions' locks do not show 'lost'",
		time - $t_pause);
	quit_session($_) for @late;
	ok(wait_for(sub { backends_gone($small, @pids) }, 6.9 - (time - $t_pause)),
		"$what: the 16 sessions ended during the freeze");
	note sprintf('%s: the 16 backends were gone %.2f s into the freeze', $what, time - $t_pause);
	my $left = 7 - (time - $t_pause);
	Time::HiRes::sleep($left) if $left > 0;    # the freeze lasts 7 s
	$etcd_s->resume;

	my ($out, $err, $elapsed) = run_sql($x, q{SELECT etcd_lock('x', 5)});
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
		is((run_sql($x, "SELECT etcd_unlock('$out')"))[0], 't', "$what: it unlocks");
	}
	quit_session($x);
	settled($small, $what);
	etcd_clean($etcd_s, $what);
	server_ok($small, $small_pm, $what);
}
$small->stop;

# ===========================================================================
# Node lc_slow: etcd first, then three endpoints that never answer
# ===========================================================================
{
	my $what = 'unlock_all vs worker';
	my $etcd_c = EtcdServer->new(name => 'lc_slow_etcd');
	my @slow = map { silent_endpoint() } 1 .. 3;
	my $slow = EtcdServer::pg_node('lc_slow', join(',', $etcd_c->url, @slow));
	my $slow_pm = postmaster_pid($slow);

	my $sa = session($slow);
	my $sb = session($slow);
	my %h;
	($h{u1}) = run_sql($sa, q{SELECT etcd_lock('u1', 60)});
	($h{u2}) = run_sql($sa, q{SELECT etcd_lock('u2', 60)});
	like($h{$_}, qr{^etcd_lock/$_/[0-9a-f]+$}, "$what: A holds $_") for qw(u1 u2);
	is(EtcdServer::lease_of($h{u1}), EtcdServer::lease_of($h{u2}), "$what: both on one lease");

	# etcd frozen for 3 s: the call meets it, then the silent endpoints
	$etcd_c->pause;
	my $t_pause = time;
	start_sql($sa, 'SELECT etcd_unlock_all()');
	my $left = 3 - (time - $t_pause);
	Time::HiRes::sleep($left) if $left > 0;    # the pause lasts 3 s
	$etcd_c->resume;
	# another session is busy meanwhile, as on any server: its new lease
	# wakes the worker while A's call still goes through the silent endpoints
	my ($wake) = run_sql($sb, q{SELECT etcd_unlock(etcd_lock('wake', 5))});
	is($wake, 't', "$what: B locks and unlocks another name after the resume");
	my ($done, $out, $err, $elapsed) = finish_sql($sa, 20);
	ok($done, sprintf('%s: etcd_unlock_all() returned (%.2f s)', $what, $elapsed));
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
	my $end = time + 4;
	while (time < $end)
	{
		$samples++;
		my $r0 = $rows->();
		my %inetcd = map { $_ => 1 } $etcd_c->keys('etcd_lock/u');
		my %b_got;
		for my $k (sort grep { $r0->{$_}[1] eq 'held' } keys %$r0)
		{
			my ($bh) = run_sql($sb, "SELECT etcd_try_lock('$k', 5)");
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
		run_sql($sb, "SELECT etcd_unlock('$_')") for values %b_got;
		last unless grep { $_->[1] eq 'held' } values %{ $rows->() };
		usleep(300_000);
	}
	note "$what: $samples samples of A's rows; $bad_key disagreed with etcd, $bad_excl let B in";
	is($bad_key, 0, "$what: A's rows show 'held' only for keys that are in etcd");
	is($bad_excl, 0, "$what: while A shows 'held', B's etcd_try_lock returns NULL");

	# A can lock again, and what it gets is real
	my ($h2, $err2) = run_sql($sa, q{SELECT etcd_lock('u1', 60)});
	note "$what: A's etcd_lock('u1', 60) said: $err2" if $err2;
	isnt(sqlstate($err2), '40L01', "$what: A's etcd_lock('u1', 60) is not 40L01");
	like($h2, qr{^etcd_lock/u1/[0-9a-f]+$}, "$what: A's etcd_lock('u1', 60) returns a handle")
	  or diag "stderr: $err2";
	ok($h2 ne '' && has_key($etcd_c, $h2), "$what: that handle is a key in etcd");
	is($slow->safe_psql('postgres',
			"SELECT state FROM etcd_locks WHERE pid = $sa->{pid} AND key = 'u1' AND handle = '$h2'"),
		'held', "$what: A's row for u1 shows that handle held");
	my ($b3) = run_sql($sb, q{SELECT etcd_try_lock('u1', 5) IS NULL});
	is($b3, 't', "$what: B cannot take u1 from A");

	run_sql($sa, 'SELECT etcd_unlock_all()');
	quit_session($sa);
	quit_session($sb);
	settled($slow, $what);
	etcd_clean($etcd_c, $what);
	server_ok($slow, $slow_pm, $what);
	$slow->stop;
	close $_ for @silent;
}

# ===========================================================================
# Node lc_main: defaults; restart_after_crash on for (c)
# ===========================================================================
my $etcd = EtcdServer->new(name => 'lc_main_etcd');
my $node = EtcdServer::pg_node('lc_main', $etcd->url, "restart_after_crash = on\n");
my $pm = postmaster_pid($node);

# ---------------------------------------------------------------------------
# (8) the ttl maximum; a day-long lease of a session terminated during a pause
# ---------------------------------------------------------------------------
{
	my $what = 'ttl maximum';
	my $s = session($node);
	my @leases0 = sort $etcd->leases;
	my $st0 = stats($node);
	my ($out, $err) = run_sql($s, q{SELECT etcd_lock('big', 2147483647)});
	note "$what: etcd_lock('big', 2147483647) said: " . ($err || "nothing, returned $out");
	is(sqlstate($err), '22023', "$what: etcd_lock('big', 2147483647) fails with SQLSTATE 22023");
	is($out, '', "$what: no handle");
	is_deeply([ $etcd->keys('etcd_lock/big/') ], [], "$what: no key in etcd");
	is_deeply([ sort $etcd->leases ], \@leases0, "$what: no lease granted in etcd");
	my $st1 = stats($node);
	is($st1->{leases}, $st0->{leases}, "$what: etcd_lock_stats.leases unchanged");
	is($st1->{locks}, $st0->{locks}, "$what: etcd_lock_stats.locks unchanged");
	run_sql($s, 'SELECT etcd_unlock_all()') if $out ne '';    # clean up after a wrong success

	$what = 'ttl 86400';
	my ($h) = run_sql($s, q{SELECT etcd_lock('big', 86400)});
	like($h, qr{^etcd_lock/big/[0-9a-f]+$}, "$what: etcd_lock('big', 86400) works");
	my $lease = EtcdServer::lease_of($h) // '';
	ok(has_key($etcd, $h), "$what: its key is in etcd");
	like($etcd->etcdctl('lease', 'timetolive', $lease), qr/granted with TTL\(86400s\)/,
		"$what: etcd granted a 86400 s lease");

	$etcd->pause;
	is($node->safe_psql('postgres', "SELECT pg_terminate_backend($s->{pid})"), 't',
		"$what: its session is terminated while etcd is paused");
	ok(wait_for(sub { backends_gone($node, $s->{pid}) }, 8), "$what: the backend ended");
	$etcd->resume;
	my $t_resume = time;
	quit_session($s);
	ok(wait_for(sub { !has_key($etcd, $h) }, 5), "$what: the key is gone from etcd within 5 s of the resume");
	ok(wait_for(sub { !has_lease($etcd, $lease) }, 5), "$what: the lease is gone from etcd");
	note sprintf('%s: cleaned up %.2f s after the resume', $what, time - $t_resume);
	settled($node, $what);
	etcd_clean($etcd, $what);
	server_ok($node, $pm, $what);
}

# ---------------------------------------------------------------------------
# (7) a stalled lease worker
# ---------------------------------------------------------------------------
{
	my $what = 'stalled worker';
	my $w = session($node);
	my ($hw) = run_sql($w, q{SELECT etcd_lock('w', 3)});
	like($hw, qr{^etcd_lock/w/[0-9a-f]+$}, "$what: W holds w (ttl 3)");
	my ($tok) = run_sql($w, "SELECT etcd_lock_token('$hw')");
	like($tok, qr/^\d+$/, "$what: its token is $tok");

	my ($wpid, $how) = worker_pid($node);
	ok($wpid, "$what: the worker's pid is " . ($wpid // 'unknown') . " (from $how)");
	SKIP:
	{
		skip "$what: no worker pid", 9 unless $wpid;
		# a stop inside its LWLock would hang every backend: then retry
		for my $try (1 .. 3)
		{
			kill 'STOP', $wpid;
			$stopped_worker = $wpid;
			wait_for(sub { EtcdServer::proc_state($wpid) eq 'T' }, 5);
			my $to = 0;
			$node->psql('postgres', 'SELECT count(*) FROM etcd_locks',
				timeout => 5, timed_out => \$to);
			last unless $to;
			diag "$what: the worker stopped holding the lock table; retrying";
			kill 'CONT', $wpid;
			usleep(10_000);
		}
		is(EtcdServer::proc_state($wpid), 'T', "$what: the worker is stopped");
		my $t_stop = time;

		ok(EtcdServer::poll_sql($node, "SELECT state FROM etcd_locks WHERE handle = '$hw'", 'lost', 10),
			"$what: etcd_locks shows 'lost' within 10 s")
		  or diag "etcd_lock_stats: "
		  . $node->safe_psql('postgres', 'SELECT row_to_json(s) FROM etcd_lock_stats s');
		note sprintf("%s: after %.1f s, the row says '%s'", $what, time - $t_stop,
			$node->safe_psql('postgres', "SELECT state FROM etcd_locks WHERE handle = '$hw'"));
		ok(wait_for(sub { !has_key($etcd, $hw) }, 8),
			"$what: etcd expired the unrenewed lease and its key (precondition)");

		my ($out, $err) = run_sql($w, "SELECT etcd_lock_token('$hw')");
		note "$what: etcd_lock_token said: " . ($err || "nothing, returned $out");
		is(sqlstate($err), '40L01', "$what: etcd_lock_token(handle) fails with SQLSTATE 40L01");

		my ($h2, $err2) = run_sql($w, q{SELECT etcd_lock('w', 3)});
		my $c2 = sqlstate($err2);
		note "$what: re-locking w said: " . ($err2 || "nothing, returned $h2");
		if ($c2 ne '')
		{
			pass("$what: re-locking w fails (SQLSTATE $c2)");
			unlike($c2, qr/^XX/, "$what: with a proper SQLSTATE ($c2)");
		}
		else
		{
			like($h2, qr{^etcd_lock/w/[0-9a-f]+$}, "$what: re-locking w returns a handle");
			isnt($h2, $hw, "$what: re-locking w takes a new key, not the dead one");
		}
		is($node->safe_psql('postgres',
				"SELECT count(*) FROM etcd_locks WHERE handle = '$hw' AND count >= 2"),
			'0', "$what: the dead hold's count never became 2");

		my ($u, $uerr) = run_sql($w, "SELECT etcd_unlock('$hw')");
		note "$what: etcd_unlock(old handle) said: $uerr" if $uerr;
		is($u, 'f', "$what: etcd_unlock(old handle) returns false");
		like($uerr, qr/WARNING:/, "$what: with a WARNING");

		kill 'CONT', $wpid;
		$stopped_worker = undef;
	}
	run_sql($w, 'SELECT etcd_unlock_all()');
	quit_session($w);
	settled($node, $what);
	etcd_clean($etcd, $what);
	my ($wpid2) = worker_pid($node);
	is($wpid2, $wpid, "$what: the same worker runs on") if $wpid;
	server_ok($node, $pm, $what);
}

# ---------------------------------------------------------------------------
# (c) kill -9 of a holder: the postmaster restarts every backend
# ---------------------------------------------------------------------------
{
	my $what = 'crash restart';
	my $s = session($node);
	my ($h) = run_sql($s, q{SELECT etcd_lock('c', 30)});
	like($h, qr{^etcd_lock/c/[0-9a-f]+$}, "$what: a session holds c (ttl 30)");
	my $lease = EtcdServer::lease_of($h) // '';
	ok(has_key($etcd, $h), "$what: its key is in etcd");
	my $off = -s $node->logfile;
	ok(kill('KILL', $s->{pid}), "$what: SIGKILL sent to backend $s->{pid}");
	quit_session($s);
	ok($node->wait_for_log(qr/all server processes terminated; reinitializing/, $off),
		"$what: the postmaster restarts the backends");
	ok($node->poll_query_until('postgres', 'SELECT 1', '1'), "$what: the server answers again");
	my $t_up = time;
	ok(wait_for(sub { !has_key($etcd, $h) }, 2 - (time - $t_up)),
		"$what: the key is gone from etcd within 2 s of the restart");
	ok(wait_for(sub { !has_lease($etcd, $lease) }, 2 - (time - $t_up)),
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
