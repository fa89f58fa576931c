# Lease renewal within the lease's budget.  A lease may be declared lost only
# when etcd says it is gone, or when no renewal attempt could still succeed
# before it expires; a keepalive that times out on one member must be retried
# on another in time, and the worker's authentication must never stall its
# keepalives.  Every part runs against real etcds with the node at the
# default etcd_lock.request_timeout (2s):
#
# a. A 3-member cluster.  Four sessions each hold a ttl-5 lock through an 8 s
#    freeze (SIGSTOP) of the follower the worker renews through, then three
#    kills of the leader (each killed member restarted once a new leader is
#    elected, before the next kill).  No lock may be lost.
# b. The first endpoint is a frozen follower: 3, then 6, simultaneous ttl-10
#    locks held for 25 s while it stays frozen.  No lock may be lost.
# c. etcd with auth on, behind a black-holed first endpoint (a port that
#    takes connections and never answers): 3 ttl-10 locks held for 25 s.
#    No lock may be lost, and the keepalives keep coming.
#
# After each part: everything released, nothing left in etcd, no crash.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use Math::BigInt;
use MIME::Base64;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

# pg_node sets request_timeout = 1s; put back the default, as a user has it
my $CONF = "etcd_lock.request_timeout = '2s'\n";
my $TTL_A = 5;
my $TTL_BC = 10;
my $FREEZE_A = 8;     # seconds the follower stays frozen in part a
my $HOLD = 25;        # seconds the locks are held under the fault in b and c
my $T0 = time;

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

# A node preloading etcd_lock with the default request_timeout.
sub new_node
{
	my ($name, $endpoints, $extra) = @_;
	my $node = pg_node($name, $endpoints, $CONF . ($extra // ''));
	is($node->safe_psql('postgres', 'SHOW etcd_lock.request_timeout'), '2s',
		"$name: etcd_lock.request_timeout is the default, 2s");
	is($node->safe_psql('postgres', 'SHOW etcd_lock.endpoints'), $endpoints,
		"$name: endpoints $endpoints");
	return $node;
}

# $n sessions, each taking one lock "$tag-$k" with ttl $ttl, all at once.
sub take_locks
{
	my ($node, $tag, $n, $ttl) = @_;
	my @l;
	for my $k (1 .. $n)
	{
		my $s = session($node);
		push @l, { s => $s, pid => $s->pid, name => "$tag-$k", ttl => $ttl };
	}
	my $t0 = time;
	$_->{s}->start("SELECT etcd_lock('$_->{name}', $ttl)") for @l;
	for my $l (@l)
	{
		my ($done, $out, $err) = $l->{s}->finish(60);
		$err //= '';
		($l->{handle}) = ($out // '') =~ m{^(etcd_lock/\Q$l->{name}\E/[0-9a-f]+)$}m;
		$l->{handle} //= '';
		$l->{orig} = $l->{handle};
		$l->{lease} = lease_of($l->{handle}) // '';
		note "$tag: $l->{name} (pid $l->{pid}): ended=$done handle=$l->{handle}"
		  . ($err =~ /\S/ ? " stderr: $err" : '');
	}
	note sprintf('%s: %d ttl-%d locks taken at once in %.1f s', $tag, $n, $ttl, time - $t0);
	is(scalar(grep { $_->{handle} ne '' } @l), $n, "$tag: $n sessions each took a ttl-$ttl lock");
	return @l;
}

# etcd_locks by pid: { handle, state, lease (hex) }.
sub view_rows
{
	my ($node) = @_;
	my %v;
	for (split /\n/, $node->safe_psql('postgres',
			q{SELECT pid, handle, state, to_hex(lease_id) FROM etcd_locks ORDER BY pid}))
	{
		my ($pid, $h, $st, $lease) = split /\|/;
		$v{$pid} = { handle => $h, state => $st, lease => $lease };
	}
	return \%v;
}

# The keys under etcd_lock/ and the lease each is attached to (hex), as etcd
# says (a linearizable read); undef if the member did not answer.
sub etcd_keys
{
	my ($m) = @_;
	my ($ok, $out) = $m->try_etcdctl('--dial-timeout=2s', '--command-timeout=3s',
		'get', '--prefix', 'etcd_lock/', '-w', 'json');
	return undef unless $ok;
	my $j = eval { JSON::PP->new->allow_bignum->decode($out) } or return undef;
	my %h;
	for my $kv (@{ $j->{kvs} // [] })
	{
		my $lease = Math::BigInt->new('' . ($kv->{lease} // 0))->as_hex =~ s/^0x//r;
		$h{ decode_base64($kv->{key}) } = lc $lease;
	}
	return \%h;
}

# The locks' original keys and leases, as etcd should still have them.
sub expected_keys { my ($l) = @_; return { map { $_->{orig} => lease_of($_->{orig}) } @$l }; }

# Every lock held: the view says 'held' for every session, stats.lost did
# not grow since $lost0, and etcd has every original key on its original
# lease.
sub check_locks
{
	my ($what, $node, $m, $l, $lost0) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $v = view_rows($node);
	is_deeply({ map { $_->{pid} => ($v->{ $_->{pid} }{state} // 'no row') } @$l },
		{ map { $_->{pid} => 'held' } @$l },
		"$what: etcd_locks says 'held' for every session's lock");
	is(stat_value($node, 'lost') - $lost0, 0, "$what: etcd_lock_stats.lost is 0");
	is_deeply(etcd_keys($m), expected_keys($l),
		"$what: every lock key is in etcd, on the lease it was taken with");
	return;
}

# Hold the locks for $secs seconds while a fault lasts, checking every 2 s
# that etcd still has every key on its lease and that the view still says
# 'held'; $m must be a member that answers.
sub hold
{
	my ($what, $secs, $node, $m, $l) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my $t0 = time;
	my $want = expected_keys($l);
	my ($samples, $unanswered, @missing, %lost_at) = (0, 0);
	sample_for($secs, 2, sub {
		my $e = etcd_keys($m);
		my $at = sprintf('%.1f s', time - $t0);
		if ($e)
		{
			$samples++;
			push @missing, map { "$at: $_" } grep { ($e->{$_} // '') ne $want->{$_} } sort keys %$want;
		}
		else
		{
			$unanswered++;
		}
		my $v = view_rows($node);
		for (@$l)
		{
			my $st = $v->{ $_->{pid} }{state} // 'no row';
			$lost_at{ $_->{name} } //= "$st at $at" if $st ne 'held';
		}
	});
	note sprintf('%s: held %.1f s, %d checks of etcd (%d unanswered)', $what, time - $t0,
		$samples, $unanswered);
	note "$what: $_ became $lost_at{$_}" for sort keys %lost_at;
	cmp_ok($samples, '>=', int($secs / 3), "$what: etcd checked $samples times over $secs s");
	is_deeply(\@missing, [], "$what: every key was in etcd on its lease at every check");
	is_deeply(\%lost_at, {}, "$what: etcd_locks said 'held' at every check");
	return;
}

# Release every lock, close the sessions, and check that nothing is left.
sub release_all
{
	my ($what, $node, $m, $l) = @_;
	local $Test::Builder::Level = $Test::Builder::Level + 1;
	my @r;
	for (@$l)
	{
		my ($out, $err) = $_->{s}->query("SELECT etcd_unlock('$_->{handle}')");
		push @r, $out;
		note "$what: unlock $_->{handle}: $out $err" if $err =~ /\S/;
	}
	is(join(',', @r), join(',', ('t') x @$l), "$what: etcd_unlock returns true for every lock");
	$_->{s}->quit for @$l;
	ok($node->poll_query_until('postgres', q{SELECT leases = 0 AND locks = 0 FROM etcd_lock_stats}),
		"$what: etcd_lock_stats.leases and .locks are 0 once the sessions closed");
	$m->wait_empty('', 20);
	$m->no_leftovers($what);
	return;
}

# ---------------------------------------------------------------------------
# The 3-member cluster of parts a and b
# ---------------------------------------------------------------------------
my @members = EtcdLockTest::Etcd->cluster(3, name => 'r');

# Every member answers and names the same leader, which is one of them (by
# the member IDs etcd reports): that leader, else undef.
sub cluster_whole
{
	my @st = map { $_->running ? $_->status : undef } @members;
	return undef if grep { !defined } @st;
	my %leaders = map { $_->{leader} => 1 } @st;
	return undef unless keys(%leaders) == 1;
	my ($id) = keys %leaders;
	return undef if $id eq '0';
	my @l = grep { $st[$_]{member_id} eq $id } 0 .. $#members;
	return @l == 1 ? $members[ $l[0] ] : undef;
}

sub wait_whole
{
	my ($what) = @_;
	my $l;
	poll_until(sub { $l = cluster_whole() }, 60, "$what: cluster whole");
	return $l;
}

# keepalives each member handled so far (gateway calls are counted too)
sub ka_by_member { return { map { $_->name => $_->grpc_calls('LeaseKeepAlive') } @members }; }

my $leader = wait_whole('start');
ok($leader, 'the cluster is up, all three members agree on one leader: ' . ($leader ? $leader->name : 'none'));

# ---------------------------------------------------------------------------
# a. ttl-5 locks through a follower freeze and three leader kills
# ---------------------------------------------------------------------------
{
	my $t_part = time;
	my @followers = grep { $_ != $leader } @members;
	# followers first: the worker starts with the first endpoint
	my $node = new_node('renew_a', join(',', map { $_->url } @followers, $leader));
	my $lost_part = stat_value($node, 'lost');
	my @l = take_locks($node, 'a', 4, $TTL_A);
	check_locks('a: before the faults', $node, $leader, \@l, $lost_part);

	# Freeze the follower that the worker renews through (the first one if it
	# renews through the leader): measured from etcd's own counters.
	my $ka_m = ka_by_member();
	my $ka0 = stat_value($node, 'keepalives');
	poll_until(sub { stat_value($node, 'keepalives') >= $ka0 + 2 * @l }, 20, 'a: the worker renews');
	my %d = map { $_->name => $_->grpc_calls('LeaseKeepAlive') - $ka_m->{ $_->name } } @members;
	note 'a: keepalives handled per member before the freeze: ' . join(' ', map { "$_=$d{$_}" } sort keys %d);
	my ($target) = sort { $d{ $b->name } <=> $d{ $a->name } } @followers;
	$target = $followers[0] unless $d{ $target->name } > 0;

	# One fault, then its verdict: once the cluster is whole again, wait
	# until a whole ttl (+1 s) has passed and each lease still held got two
	# more keepalives (a lease unrenewed by then would have been declared
	# lost);
	# then count the locks lost, and take lost ones again so that the next
	# fault is tested with all four.
	my $verdict = sub {
		my ($what, $lost0) = @_;
		my $t_whole = time;
		my $k0 = stat_value($node, 'keepalives');
		my $held = sub {
			scalar grep { $_ eq 'held' } split /\n/,
			  $node->safe_psql('postgres', 'SELECT state FROM etcd_locks');
		};
		poll_until(sub {
				time >= $t_whole + $TTL_A + 1
				  && stat_value($node, 'keepalives') >= $k0 + 2 * $held->() },
			30, "$what: a ttl after recovery");
		my $v = view_rows($node);
		my @gone = grep { ($v->{ $_->{pid} }{state} // 'no row') ne 'held' } @l;
		is(stat_value($node, 'lost') - $lost0, 0, "$what: no lock lost (etcd_lock_stats.lost)");
		is(join(' ', map { "$_->{name}=" . ($v->{ $_->{pid} }{state} // 'no row') } @gone), '',
			"$what: etcd_locks still says 'held' for all four");
		for my $g (@gone)
		{
			my ($out, $err) = $g->{s}->query('SELECT etcd_unlock_all()');
			($out, $err) = $g->{s}->query("SELECT etcd_lock('$g->{name}', $TTL_A)");
			note "$what: $g->{name} lost; taken again: $out";
			$g->{handle} = $out if $out =~ m{^etcd_lock/};
		}
	};

	my $lost0 = stat_value($node, 'lost');
	note "a: freezing follower $target->{name} for $FREEZE_A s (leader $leader->{name})";
	$target->pause;
	hold("a: follower $target->{name} frozen", $FREEZE_A, $node, $leader, \@l);
	$target->resume;
	$target->wait_healthy;
	my $l2 = wait_whole('a: after the freeze');
	note 'a: leader after the freeze: ' . ($l2 ? $l2->name : 'none');
	$verdict->("a: $FREEZE_A s freeze of follower $target->{name}", $lost0);

	for my $i (1 .. 3)
	{
		my $victim = wait_whole("a: before kill $i");
		$lost0 = stat_value($node, 'lost');
		my @surv = grep { $_ != $victim } @members;
		$victim->stop('KILL');
		my $t_kill = time;
		my $new;
		ok(poll_until(sub { $new = EtcdLockTest::Etcd->leader_of(@surv) }, 30, "a: kill $i: new leader"),
			"a: kill $i: a survivor was elected leader");
		note sprintf('a: kill %d: leader %s killed, %s leader %.1f s later', $i, $victim->name,
			$new ? $new->name : 'none', time - $t_kill);
		$victim->start;
		my $w = wait_whole("a: kill $i: restarted");
		ok($w, "a: kill $i: $victim->{name} restarted, three members agree on leader "
			  . ($w ? $w->name : 'none'));
		note sprintf('a: kill %d: cluster whole %.1f s after the kill', $i, time - $t_kill);
		$verdict->("a: leader kill $i", $lost0);
	}

	$leader = wait_whole('a: end');
	check_locks('a: after the freeze and three leader kills', $node, $leader, \@l, $lost_part);
	release_all('a', $node, $leader, \@l);
	server_ok($node, 'a');
	$node->stop;
	note sprintf('part a took %.0f s', time - $t_part);
}

# ---------------------------------------------------------------------------
# b. The first endpoint is a frozen follower: 3, then 6, ttl-10 locks
# ---------------------------------------------------------------------------
{
	my $t_part = time;
	$leader = wait_whole('b: start');
	my @followers = grep { $_ != $leader } @members;
	my $frozen = $followers[0];
	my $node = new_node('renew_b', join(',', map { $_->url } $frozen, $followers[1], $leader));
	for my $n (3, 6)
	{
		my $tag = "b$n";
		$leader = wait_whole("$tag: start");
		ok($leader && $leader != $frozen, "$tag: the first endpoint, $frozen->{name}, is a follower");
		my $lost0 = stat_value($node, 'lost');
		my @l = take_locks($node, $tag, $n, $TTL_BC);
		check_locks("$tag: before the freeze", $node, $leader, \@l, $lost0);
		$frozen->pause;
		note "$tag: $frozen->{name} frozen";
		hold("$tag: first endpoint frozen", $HOLD, $node, $leader, \@l);
		check_locks("$tag: after $HOLD s with the first endpoint frozen", $node, $leader, \@l, $lost0);
		$frozen->resume;
		$frozen->wait_healthy;
		$leader = wait_whole("$tag: after the freeze");
		release_all($tag, $node, $leader, \@l);
	}
	server_ok($node, 'b');
	$node->stop;
	note sprintf('part b took %.0f s', time - $t_part);
}
$_->stop for @members;

# ---------------------------------------------------------------------------
# c. etcd auth on, the first endpoint a black hole
# ---------------------------------------------------------------------------
{
	my $t_part = time;
	my $etcd = EtcdLockTest::Etcd->new(name => 'auth');
	$etcd->enable_auth('secret');
	my $pw_file = PostgreSQL::Test::Utils::tempdir('renew_c') . '/pglock.pw';
	PostgreSQL::Test::Utils::append_to_file($pw_file, "secret\n");
	my ($ok) = $etcd->try_etcdctl('--dial-timeout=2s', '--command-timeout=2s', '--user', 'pglock:wrong',
		'get', 'etcd_lock/x');
	ok(!$ok, 'c: auth is on: etcd refuses a wrong password');

	# The black hole: listens, never accepts; the backlog completes the
	# connections, and nothing ever answers on them.
	my $bh_port = PostgreSQL::Test::Cluster::get_free_port();
	my $bh = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $bh_port,
		Listen => 128, ReuseAddr => 1, Proto => 'tcp') or die "black hole on $bh_port: $!";
	my $probe = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $bh_port,
		Proto => 'tcp', Timeout => 2);
	ok($probe, 'c: the black hole takes connections');
	if ($probe)
	{
		print $probe "POST /v3/lease/keepalive HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
		ok(!IO::Select->new($probe)->can_read(1), 'c: and does not answer a request within 1 s');
		close $probe;
	}

	my $black = "http://127.0.0.1:$bh_port";
	my $node = new_node('renew_c', "$black," . $etcd->url, qq{
etcd_lock.user = 'pglock'
etcd_lock.password_file = '$pw_file'
});
	my $lost0 = stat_value($node, 'lost');
	my $fail0 = stat_value($node, 'failures');
	my @l = take_locks($node, 'c', 3, $TTL_BC);
	note 'c: requests that failed while taking the locks (the black hole): '
	  . (stat_value($node, 'failures') - $fail0);
	check_locks('c: before the hold', $node, $etcd, \@l, $lost0);

	my $ka0 = stat_value($node, 'keepalives');
	my $eka0 = $etcd->grpc_calls('LeaseKeepAlive');
	hold('c: black-holed first endpoint, auth on', $HOLD, $node, $etcd, \@l);
	check_locks("c: after $HOLD s behind the black hole", $node, $etcd, \@l, $lost0);
	my $ka = stat_value($node, 'keepalives') - $ka0;
	my $eka = $etcd->grpc_calls('LeaseKeepAlive') - $eka0;
	note "c: over $HOLD s: etcd_lock_stats.keepalives +$ka, keepalives handled by etcd +$eka";
	# to live 25 s, a ttl-10 lease needs at least two renewals
	cmp_ok($ka, '>=', 2 * @l, 'c: etcd_lock_stats.keepalives grew: the worker kept renewing');
	cmp_ok($eka, '>=', 2 * @l, 'c: etcd handled at least two keepalives per lease');
	release_all('c', $node, $etcd, \@l);
	server_ok($node, 'c');
	$node->stop;
	close $bh;
	note sprintf('part c took %.0f s', time - $t_part);
}

note sprintf('013_renewal took %.0f s', time - $T0);
done_testing();
