# Guarded counter: 8 concurrent sessions spread over two PostgreSQL servers
# that use the same etcd increment one counter row with a read-modify-write
# guarded by etcd_xact_lock('counter').
#
# Design.  The counter is one row, in a table on server A.  Every session
# takes the lock on its OWN server, so the two servers' etcd_lock modules
# contend for the one etcd key prefix etcd_lock/counter/:
#   - 4 pgbench clients on A:  BEGIN; etcd_xact_lock on A; SELECT v \gset;
#     UPDATE SET v = :v + 1; log row; COMMIT (on A: the write is in the
#     transaction that holds the lock, released after the COMMIT is visible).
#   - 4 pgbench clients on B:  BEGIN; etcd_xact_lock on B; then, through a
#     dblink connection to A, a remote transaction (BEGIN; SELECT v; UPDATE
#     SET v = <v read> + 1; log row; COMMIT) that commits on A before B's
#     COMMIT releases the lock.
# Each increment reads the value and then writes value+1 as two statements
# in READ COMMITTED, with pg_sleep(0.001) in between, which loses updates
# when nothing serializes the sessions.  Each session makes 100 increments.
# Every increment also inserts a log row on A carrying the value it wrote
# and its fencing token, so the test checks: final value = commits = log
# rows, every value 1..N written exactly once, fencing tokens strictly
# increasing in the order of the values, and that the two servers really
# interleaved.  The same run without the lock must lose updates.
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

my $CLIENTS = 4;      # pgbench clients per server
my $TXNS = 100;       # increments per client
my $TOTAL = 2 * $CLIENTS * $TXNS;

my $etcd = EtcdLockTest::Etcd->new(name => 'counter');
my $node_a = pg_node('counter_a', $etcd->url);
my $node_b = pg_node('counter_b', $etcd->url);

$node_a->safe_psql('postgres', q{
CREATE TABLE counter (id int PRIMARY KEY, v int NOT NULL);
INSERT INTO counter VALUES (1, 0);
CREATE TABLE increments (
    seq bigserial PRIMARY KEY,
    node text NOT NULL,
    client int NOT NULL,
    v int NOT NULL,
    token bigint,
    at timestamptz NOT NULL DEFAULT clock_timestamp());
});
$node_b->safe_psql('postgres', 'CREATE EXTENSION dblink');

my $conn_a = 'host=' . $node_a->host . ' port=' . $node_a->port . ' dbname=postgres';
my $dir = PostgreSQL::Test::Utils::tempdir('counter');

# The lock statement returns the fencing token into :token.
sub script_a
{
	my ($locked) = @_;
	my $lock = $locked
	  ? q{SELECT etcd_lock_token(etcd_xact_lock('counter')) AS token \gset}
	  : q{SELECT 'NULL' AS token \gset};
	return qq{BEGIN;
$lock
SELECT v FROM counter WHERE id = 1 \\gset
SELECT pg_sleep(0.001);
UPDATE counter SET v = :v + 1 WHERE id = 1;
INSERT INTO increments (node, client, v, token) VALUES ('A', :client_id, :v + 1, :token);
COMMIT;
};
}

sub script_b
{
	my ($locked) = @_;
	my $lock = $locked
	  ? q{SELECT etcd_lock_token(etcd_xact_lock('counter')) AS token \gset}
	  : q{SELECT 'NULL' AS token \gset};
	return qq{SELECT CASE WHEN 'a' = ANY (coalesce(dblink_get_connections(), '{}')) THEN 'OK' ELSE dblink_connect('a', '$conn_a') END;
BEGIN;
$lock
SELECT dblink_exec('a', 'BEGIN');
SELECT v FROM dblink('a', 'SELECT v FROM counter WHERE id = 1') AS t(v int) \\gset
SELECT pg_sleep(0.001);
SELECT dblink_exec('a', 'UPDATE counter SET v = ' || (:v + 1) || ' WHERE id = 1');
SELECT dblink_exec('a', 'INSERT INTO increments (node, client, v, token) VALUES (''B'', ' || :client_id || ', ' || (:v + 1) || ', ' || coalesce((:token)::text, 'NULL') || ')');
SELECT dblink_exec('a', 'COMMIT');
COMMIT;
};
}

sub write_script
{
	my ($name, $text) = @_;
	my $file = "$dir/$name.sql";
	PostgreSQL::Test::Utils::append_to_file($file, $text);
	return $file;
}

# Server-wide counters of one node; requests without the keepalives.
sub counters
{
	my ($node) = @_;
	my ($req, $ka, $acq, $lost) = split /\|/, $node->safe_psql('postgres',
		'SELECT requests, keepalives, acquired, lost FROM etcd_lock_stats');
	return { requests => $req - $ka, acquired => $acq, lost => $lost };
}

# Run both pgbench runs at once; returns (elapsed seconds, processed on A,
# processed on B).
sub run_both
{
	my ($tag, $file_a, $file_b) = @_;
	my %run;
	my $t0 = time;
	for my $n ([ 'A', $node_a, $file_a ], [ 'B', $node_b, $file_b ])
	{
		my ($name, $node, $file) = @$n;
		my $r = { out => '', err => '' };
		$r->{h} = IPC::Run::start(
			[ 'pgbench', '-n', '-c', $CLIENTS, '-j', $CLIENTS, '-t', $TXNS,
			  '-f', $file, '-h', $node->host, '-p', $node->port, 'postgres' ],
			'<', \undef, '>', \$r->{out}, '2>', \$r->{err},
			IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
		$run{$name} = $r;
	}
	my %processed;
	for my $name (qw(A B))
	{
		my $r = $run{$name};
		my $ok = eval { $r->{h}->finish };
		ok($ok, "$tag: pgbench on server $name succeeded")
		  or diag("pgbench $name: $@\nstdout:\n$r->{out}\nstderr:\n$r->{err}");
		my ($p) = $r->{out} =~ /number of transactions actually processed: (\d+)/;
		$processed{$name} = $p // 0;
		my ($tps) = $r->{out} =~ /tps = ([\d.]+) \(without initial connection time\)/;
		note "$tag: pgbench on $name: $processed{$name} transactions, tps " . ($tps // '?');
	}
	return (time - $t0, $processed{A}, $processed{B});
}

sub counter_state
{
	return split /\|/, $node_a->safe_psql('postgres', q{
SELECT (SELECT v FROM counter WHERE id = 1),
       count(*), count(DISTINCT v), max(v)
FROM increments});
}

# Both servers' sessions have ended: no lock, key or lease left anywhere.
sub nothing_left
{
	my ($tag) = @_;
	for my $node ($node_a, $node_b)
	{
		ok($node->poll_query_until('postgres',
				'SELECT locks = 0 AND leases = 0 FROM etcd_lock_stats'),
			"$tag: no lock or lease left on " . $node->name);
	}
	$etcd->wait_empty('etcd_lock/');
	$etcd->no_leftovers($tag, 'etcd_lock/');
	return;
}

# --- with the lock ---------------------------------------------------------

my $s0a = counters($node_a);
my $s0b = counters($node_b);
my ($secs, $pa, $pb) = run_both('locked',
	write_script('locked_a', script_a(1)), write_script('locked_b', script_b(1)));
my $commits = $pa + $pb;
is($commits, $TOTAL, "locked: all $TOTAL transactions committed");

my ($v, $rows, $distinct, $max) = counter_state();
is($v, $commits, 'locked: final value equals the number of commits');
is($rows, $commits, 'locked: one log row per commit');
is($distinct, $rows, 'locked: each value was written exactly once');
is($max, $commits, 'locked: values run 1..N');

is($node_a->safe_psql('postgres', q{
SELECT count(*) FROM (
    SELECT token, lag(token) OVER (ORDER BY v) AS prev FROM increments) s
WHERE prev IS NOT NULL AND token <= prev}), '0',
	'locked: fencing tokens strictly increase with the values written');

# the two servers really contended: their increments interleave
my ($switches, $overlap) = split /\|/, $node_a->safe_psql('postgres', q{
SELECT (SELECT count(*) FROM (
            SELECT node, lag(node) OVER (ORDER BY v) AS prev FROM increments) s
        WHERE node <> prev),
       (SELECT max(at) FILTER (WHERE node = 'A') > min(at) FILTER (WHERE node = 'B')
           AND max(at) FILTER (WHERE node = 'B') > min(at) FILTER (WHERE node = 'A')
        FROM increments)});
is($overlap, 't', 'locked: the two servers ran at the same time');
cmp_ok($switches, '>=', 10, 'locked: the lock passed between the servers');
note "locked: the lock passed between servers $switches times";

my $s1a = counters($node_a);
my $s1b = counters($node_b);
is($s1a->{acquired} - $s0a->{acquired}, $pa, 'locked: server A acquired once per transaction');
is($s1b->{acquired} - $s0b->{acquired}, $pb, 'locked: server B acquired once per transaction');
is($s1a->{lost} + $s1b->{lost}, 0, 'locked: no lock was lost');
note sprintf('locked: %d commits in %.2f s = %.0f commits/s over both servers',
	$commits, $secs, $commits / $secs);
note sprintf('locked, contended: %.2f etcd requests per transaction on A, %.2f on B (keepalives excluded)',
	($s1a->{requests} - $s0a->{requests}) / $pa,
	($s1b->{requests} - $s0b->{requests}) / $pb);
nothing_left('locked');

# --- uncontended, for the request count ------------------------------------

my $s2a = counters($node_a);
my $solo = 50;
my ($solo_out, $solo_err) = ('', '');
my $solo_ok = IPC::Run::run(
	[ 'pgbench', '-n', '-c', 1, '-t', $solo, '-f', write_script('solo', script_a(1)),
	  '-h', $node_a->host, '-p', $node_a->port, 'postgres' ],
	'<', \undef, '>', \$solo_out, '2>', \$solo_err);
ok($solo_ok, 'uncontended: pgbench succeeded') or diag($solo_err);
nothing_left('uncontended');
my $solo_requests = counters($node_a)->{requests} - $s2a->{requests};
# acquire + commit check + release per transaction, plus the session's one
# lease grant and its revoke at exit
cmp_ok($solo_requests, '<=', 3 * $solo + 2,
	'uncontended: at most 3 etcd requests per transaction-lock cycle');
note sprintf('uncontended: %d etcd requests for %d transactions (%.2f each, incl. one lease grant and revoke)',
	$solo_requests, $solo, $solo_requests / $solo);

# --- the same run without the lock -----------------------------------------

$node_a->safe_psql('postgres', 'UPDATE counter SET v = 0; TRUNCATE increments');
my $s3a = counters($node_a);
my $s3b = counters($node_b);
($secs, $pa, $pb) = run_both('unlocked',
	write_script('unlocked_a', script_a(0)), write_script('unlocked_b', script_b(0)));
$commits = $pa + $pb;
is($commits, $TOTAL, "unlocked: all $TOTAL transactions committed");
($v, $rows, $distinct, $max) = counter_state();
is($rows, $commits, 'unlocked: one log row per commit');
cmp_ok($v, '<', $commits, 'unlocked: updates were lost (final value < commits)');
cmp_ok($distinct, '<', $rows, 'unlocked: some values were written more than once');
note "unlocked: final value $v after $commits commits";
is(counters($node_a)->{acquired} - $s3a->{acquired} + counters($node_b)->{acquired} - $s3b->{acquired},
	0, 'unlocked: no etcd lock was taken');
nothing_left('unlocked');

for my $node ($node_a, $node_b)
{
	unlike(PostgreSQL::Test::Utils::slurp_file($node->logfile),
		qr/terminated by signal|PANIC|TRAP:/, 'no backend crashed on ' . $node->name);
}

$node_a->stop;
$node_b->stop;
done_testing();
