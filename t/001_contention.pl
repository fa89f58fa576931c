# Two sessions contending for one lock; FIFO order; handoff on unlock and on
# session end.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $etcd = EtcdLockTest::Etcd->new(name => 'contention');
my $node = pg_node('contention', $etcd->url);

my $s1 = session($node);
my $s2 = session($node);

my $h1 = $s1->query_safe(q{SELECT etcd_lock('orders')});
like($h1, qr{^etcd_lock/orders/[0-9a-f]+$}, 'session 1 holds the lock');
is_deeply([ $etcd->keys('etcd_lock/orders/') ], [$h1], 'one key in etcd, the handle');

# session 2 queues behind it
$s2->start(q{SELECT etcd_lock('orders')});
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM etcd_locks WHERE key = 'orders' AND state = 'waiting'})
  or die 'session 2 is not waiting';
is(scalar($etcd->keys('etcd_lock/orders/')), 2, 'the waiter has its own key');
is($s1->query_safe(q{SELECT etcd_try_lock('orders')}), $h1,
	'the holder re-enters without waiting');
$s1->query_safe(qq{SELECT etcd_unlock('$h1')});
is($node->safe_psql('postgres',
		q{SELECT state FROM etcd_locks WHERE key = 'orders' ORDER BY state}),
	"held\nwaiting", 'one unlock of two holds keeps the lock');

my $t0 = time;
$s1->query_safe(qq{SELECT etcd_unlock('$h1')});
my (undef, $h2) = $s2->finish;
my $handoff_ms = (time - $t0) * 1000;
note sprintf('handoff after unlock: %.1f ms (includes psql round trips)', $handoff_ms);
like($h2, qr{^etcd_lock/orders/[0-9a-f]+$}, 'session 2 gets a handle once session 1 unlocked');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM etcd_locks WHERE key = 'orders' AND state = 'held'}),
	'1', 'session 2 holds the lock after session 1 unlocked');

# a third session cannot take it while session 2 holds it
is($node->safe_psql('postgres', q{SELECT etcd_try_lock('orders') IS NULL}), 't',
	'try_lock returns NULL while held elsewhere');
is(scalar($etcd->keys('etcd_lock/orders/')), 1, 'the failed try left no key');

# FIFO: three waiters queue in order and are served in that order
$node->safe_psql('postgres', q{CREATE TABLE fifo (i int, at timestamptz)});
my @w;
for my $i (1 .. 3)
{
	my $s = session($node);
	$s->start(qq{SELECT etcd_lock('orders');
INSERT INTO fifo VALUES ($i, clock_timestamp());
SELECT etcd_unlock_all();});
	$node->poll_query_until('postgres',
		qq{SELECT count(*) = $i FROM etcd_locks WHERE key = 'orders' AND state = 'waiting'})
	  or die "waiter $i did not queue";
	push @w, $s;
}
# session 2 ends: its lock goes with it
$s2->quit;
$node->poll_query_until('postgres', q{SELECT count(*) = 3 FROM fifo})
  or die 'waiters were not served';
is($node->safe_psql('postgres', q{SELECT string_agg(i::text, ',' ORDER BY at) FROM fifo}),
	'1,2,3', 'waiters are served in FIFO order');
$_->quit for @w;
$s1->quit;

$node->poll_query_until('postgres', q{SELECT count(*) = 0 FROM etcd_locks})
  or die 'locks left behind';
is(scalar($etcd->keys('etcd_lock/')), 0, 'no key left in etcd');
ok(poll_until(sub { scalar($etcd->leases) == 0 }, undef, 'no lease left'),
	'no lease left in etcd');

$node->stop;
done_testing();
