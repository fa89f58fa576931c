# etcd over TLS with client certificates (mTLS), as k3s runs it: the success
# path (lock, queue with a watch over TLS, keepalives, endpoint health), then
# every misconfiguration the settings allow.  Each must give a clear class-08
# error naming the file or the endpoint, leave nothing in etcd, not crash the
# server, and the same session must work again once the setting is fixed.
# Verification cannot be turned off, and the TLS settings are superuser-only.
use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EtcdLockTest;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

# generous bound for "a failure is reported promptly" (request_timeout is 1s)
my $PROMPT = 10;

my $pki = make_pki();

# A second listener on 127.0.0.2 serves the same certificate, which does not
# name that address: for the host name check.
my $alt_port = PostgreSQL::Test::Cluster::get_free_port();
my $etcd = EtcdLockTest::Etcd->new(name => 'tls', tls => $pki,
	listen_extra => ["https://127.0.0.2:$alt_port"]);
like($etcd->url, qr{^https://127\.0\.0\.1:\d+$}, 'etcd serves https only');

my $good = {
	'etcd_lock.cacert' => $pki->{ca},
	'etcd_lock.cert' => $pki->{client_cert},
	'etcd_lock.key' => $pki->{client_key},
};
my $node = pg_node('tls', $etcd->url, join('',
		map { "$_ = '$good->{$_}'\n" } sort keys %$good));

# ---------------------------------------------------------------------------
# Success path
# ---------------------------------------------------------------------------
my $s1 = session($node);
my $s2 = session($node);
my $s1_pid = $s1->pid;

is($s1->query_safe('SHOW etcd_lock.cacert'), $pki->{ca}, 'superuser sees etcd_lock.cacert');

my $h1 = $s1->query_safe(q{SELECT etcd_lock('tls-lock', 2)});
like($h1, qr{^etcd_lock/tls-lock/[0-9a-f]+$}, 'a lock over mTLS');
is_deeply([ $etcd->keys('etcd_lock/tls-lock/') ], [$h1], 'its key is in etcd (read with etcdctl over mTLS)');

# a second session queues, and is woken by its watch over TLS
$s2->start(q{SELECT etcd_lock('tls-lock')});
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM etcd_locks WHERE key = 'tls-lock' AND state = 'waiting'}),
	'the second session waits');
is(scalar($etcd->keys('etcd_lock/tls-lock/')), 2, 'the waiter has its own key');

# keepalives over TLS: the ttl-2 lease outlives several TTLs
my $ka0 = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats');
my $t0 = time;
ok( poll_until(sub {
			$node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats') >= $ka0 + 6
			  && time - $t0 > 3 }, undef, '6 keepalives'),
	'the worker renews the lease over TLS');
is_deeply([ grep { $_ eq $h1 } $etcd->keys('etcd_lock/tls-lock/') ], [$h1],
	'the ttl-2 lock is still in etcd after more than one TTL');
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $s1_pid}),
	'held', 'it is still held');

is($s1->query_safe(qq{SELECT etcd_unlock('$h1')}), 't', 'unlock over TLS');
my (undef, $h2) = $s2->finish;
like($h2, qr{^etcd_lock/tls-lock/[0-9a-f]+$}, 'the waiter acquires after the unlock (watch over TLS)');
is_deeply([ $etcd->keys('etcd_lock/tls-lock/') ], [$h2], 'only the new holder\'s key is left');
is($s2->query_safe('SELECT etcd_unlock_all()'), '1', 'the waiter releases');

my $health = $node->safe_psql('postgres',
	q{SELECT endpoint, healthy, is_leader, version IS NOT NULL, error IS NULL FROM etcd_endpoint_health()});
is($health, $etcd->url . '|t|t|t|t', 'etcd_endpoint_health() over mTLS: healthy leader');

# transaction locks too, with the commit check
is($s1->query_safe(q{BEGIN; SELECT etcd_xact_lock('tls-xact') IS NOT NULL; COMMIT;}), 't',
	'a transaction lock over TLS commits');
$s1->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('success path', 'etcd_lock/');

# ---------------------------------------------------------------------------
# Failures.  Each case breaks the settings and reloads; etcd_lock() must fail
# with the expected error in a new session and in $s1, then the good settings
# come back and $s1 must lock again.
# ---------------------------------------------------------------------------
my $missing = "$pki->{dir}/no-such-file.pem";
my $unreadable = "$pki->{dir}/unreadable.key";
PostgreSQL::Test::Utils::system_or_bail('cp', $pki->{client_key}, $unreadable);
chmod 0000, $unreadable;
my $can_read_unreadable = open(my $probe, '<', $unreadable);
close $probe if $can_read_unreadable;

my %observed;

# $s1 has talked to etcd before each case, so its client has a pooled
# connection made with the good settings; the new settings must apply to it
# all the same.  A fresh session shows the error as a new backend meets it.
sub tls_case
{
	my (%c) = @_;
	my $what = $c{name};
	my %conf = (%$good, %{ $c{conf} // {} });
	$conf{'etcd_lock.endpoints'} = $c{endpoint} // $etcd->url;

	set_conf($node, [$s1], %conf);
	my $fresh = session($node);
	my ($o, $err, undef, $elapsed) = $fresh->query(q{SELECT etcd_lock('tls-fail')});
	my $code = sqlstate($err);
	$observed{$what} = "$code: " . errmsg($err);
	note "$what: $err";
	is($o, '', "$what: no handle returned");
	like($code, qr/^08/, "$what: a class-08 error");
	is($code, $c{code}, "$what: SQLSTATE $c{code}");
	like($err, $c{msg}, "$what: the message names the " . ($c{names} // 'endpoint'));
	# curl reports etcd's refusal of the certificate as a receive error, or,
	# when it lands on the HTTP/2 preface, as an HTTP/2 failure: both must
	# give the message and the hint
	like($err, $c{hint}, "$what: the hint names the client certificate") if $c{hint};
	unlike($err, qr/curl|CURLE/i, "$what: not a bare curl code");
	cmp_ok($elapsed, '<', $PROMPT, "$what: reported promptly");
	$fresh->quit;

	# the session with a pooled connection gets the same error
	($o, $err) = $s1->query(q{SELECT etcd_lock('tls-fail')});
	note "$what (pooled session): " . ($err || "no error, got $o");
	is(sqlstate($err), $c{code},
		"$what: a session that had a connection open also gets SQLSTATE $c{code}");
	$s1->query('SELECT etcd_unlock_all()') if $o ne '';

	$etcd->no_leftovers($what, 'etcd_lock/');
	is($node->safe_psql('postgres', 'SELECT count(*) FROM etcd_locks'), '0',
		"$what: no row in etcd_locks");
	server_ok($node, $what);

	# fix it: the same session works again
	set_conf($node, [$s1], %$good, 'etcd_lock.endpoints' => $etcd->url);
	my ($h, $err2) = $s1->query(q{SELECT etcd_lock('tls-fail')});
	is($err2, '', "$what fixed: no error");
	like($h, qr{^etcd_lock/tls-fail/[0-9a-f]+$}, "$what fixed: the same session locks again");
	is_deeply([ $etcd->keys('etcd_lock/tls-fail/') ], [$h], "$what fixed: the key is in etcd");
	is(scalar($s1->query('SELECT etcd_unlock_all()')), '1', "$what fixed: unlock");
	$etcd->no_leftovers("$what fixed", 'etcd_lock/');
	return;
}

my $ep = qr/\Q${\$etcd->url}\E/;
tls_case(
	name => 'wrong CA',
	conf => { 'etcd_lock.cacert' => $pki->{ca2} },
	code => '08001',
	msg => qr/could not verify the TLS certificate of etcd at $ep.*\Q$pki->{ca2}\E/s,
	names => 'endpoint and the CA file');
tls_case(
	name => 'empty cacert (system CAs)',
	conf => { 'etcd_lock.cacert' => '' },
	code => '08001',
	msg => qr/could not verify the TLS certificate of etcd at $ep/);
tls_case(
	name => 'host name not in the certificate',
	endpoint => "https://127.0.0.2:$alt_port",
	code => '08001',
	msg => qr{could not verify the TLS certificate of etcd at https://127\.0\.0\.2:$alt_port});
tls_case(
	name => 'missing CA file',
	conf => { 'etcd_lock.cacert' => $missing },
	code => '08001',
	msg => qr/could not load the CA file "\Q$missing\E" set in etcd_lock\.cacert/,
	names => 'file');
tls_case(
	name => 'client certificate from another CA',
	conf => { 'etcd_lock.cert' => $pki->{client2_cert}, 'etcd_lock.key' => $pki->{client2_key} },
	code => '08006',
	msg => qr/connection to etcd at $ep failed/,
	hint => qr/HINT:  etcd may have refused the client certificate "\Q$pki->{client2_cert}\E" set in etcd_lock\.cert\./);
tls_case(
	name => 'no client certificate',
	conf => { 'etcd_lock.cert' => '', 'etcd_lock.key' => '' },
	code => '08006',
	msg => qr/connection to etcd at $ep failed/,
	hint => qr/HINT:  etcd may require a client certificate: set etcd_lock\.cert and etcd_lock\.key\./);
tls_case(
	name => 'missing key file',
	conf => { 'etcd_lock.key' => $missing },
	code => '08001',
	msg => qr/could not read the client key "\Q$missing\E" set in etcd_lock\.key: No such file/,
	names => 'file');
SKIP:
{
	skip 'running as a user that can read a mode-000 file', 1 if $can_read_unreadable;
	tls_case(
		name => 'unreadable key file',
		conf => { 'etcd_lock.key' => $unreadable },
		code => '08001',
		msg => qr/could not read the client key "\Q$unreadable\E" set in etcd_lock\.key: Permission denied/,
		names => 'file');
}
tls_case(
	name => 'missing certificate file',
	conf => { 'etcd_lock.cert' => $missing },
	code => '08001',
	msg => qr/could not read the client certificate "\Q$missing\E" set in etcd_lock\.cert/,
	names => 'file');
tls_case(
	name => 'key that does not match the certificate',
	conf => { 'etcd_lock.key' => $pki->{client2_key} },
	code => '08001',
	msg => qr/could not use the client certificate "\Q$pki->{client_cert}\E" and key "\Q$pki->{client2_key}\E"/,
	names => 'files');
(my $http_url = $etcd->url) =~ s/^https/http/;
tls_case(
	name => 'http:// URL to the TLS port',
	endpoint => $http_url,
	code => '08006',
	# over HTTP/1.1 (json) etcd closes at once; over HTTP/2 (grpc) the send fails
	msg => qr/etcd at \Q$http_url\E (closed the connection without answering|failed)/,
	hint => qr/HINT:  An http:\/\/ endpoint that points at a TLS port does this\./);

# ---------------------------------------------------------------------------
# No way to turn verification off, and the settings are superuser-only
# ---------------------------------------------------------------------------
is( $node->safe_psql('postgres',
		q{SELECT string_agg(name, ',') FROM pg_settings WHERE name LIKE 'etcd_lock.%'
		  AND name ~ '(verify|insecure|skip|ssl|tls)'}),
	'', 'no etcd_lock setting could turn verification off');
my ($o, $err) = $s1->query(q{SET etcd_lock.insecure = on});
is(sqlstate($err), '42602', 'an invented etcd_lock.* setting is rejected (reserved prefix)');

$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN');
my $alice = session($node, user => 'alice');
is($alice->query_safe('SELECT current_user'), 'alice', 'a non-superuser session');
superuser_only_ok($alice, "etcd_lock.$_") for qw(cacert cert key);
($o, $err) = $alice->query("SET etcd_lock.endpoints = 'http://127.0.0.1:1'");
is(sqlstate($err), '55P02', 'non-superuser: SET etcd_lock.endpoints fails (55P02)');
($o, $err) = $alice->query("SET etcd_lock.prefix = 'other/'");
is(sqlstate($err), '42501', 'non-superuser: SET etcd_lock.prefix is refused (42501: superuser-only)');
is($node->safe_psql('postgres',
		q{SELECT count(*) FROM pg_settings WHERE name IN ('etcd_lock.cacert', 'etcd_lock.cert', 'etcd_lock.key')}),
	'3', 'the superuser sees all three TLS settings in pg_settings');
# the non-superuser can still lock, with the server's TLS settings
my $ha = $alice->query_safe(q{SELECT etcd_lock('alice')});
like($ha, qr{^etcd_lock/alice/[0-9a-f]+$}, 'non-superuser locks over the server\'s mTLS settings');
is($alice->query_safe('SELECT etcd_unlock_all()'), '1', 'non-superuser unlocks');
$alice->quit;

$s1->quit;
$s2->quit;
$etcd->wait_empty('etcd_lock/');
$etcd->no_leftovers('at the end', 'etcd_lock/');

note "observed: $_ => $observed{$_}" for sort keys %observed;
$node->stop;
done_testing();
