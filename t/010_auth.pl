# etcd with auth enabled and a least-privilege role: etcd_lock's user may
# read and write etcd_lock/ and nothing else (the role the README documents).
# Locks work; names cannot leave the prefix, and etcd itself refuses a key
# outside it; the password is hidden from non-superusers; a wrong password is
# 28P01 and a fixed one works in the same session; the token is cached, and
# renewed transparently when it expires (etcd runs with --auth-token-ttl 3);
# the worker authenticates on its own and keeps a ttl-2 lock alive; an empty
# user gets a clear error; an etcd without auth works with the user set.
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

my $TOKEN_TTL = 3;
my $etcd = EtcdLockTest::Etcd->new(name => 'auth', extra => [ '--auth-token-ttl', $TOKEN_TTL ]);
$etcd->enable_auth;
like($etcd->etcdctl('role', 'get', 'etcd_lock_role'), qr/KV Read:\s+\[etcd_lock\/, etcd_lock0\)/,
	'etcd_lock_role may read and write etcd_lock/ only');
my ($ok, $o, $e) = $etcd->try_etcdctl('--dial-timeout=2s', 'get', 'x');
ok($ok, 'etcdctl works as root');
$ok = IPC::Run::run([ 'etcdctl', '--endpoints', $etcd->url, '--dial-timeout=2s',
		'--command-timeout=2s', 'put', 'etcd_lock/probe', 'v' ], '<', \undef, '>', \$o, '2>', \$e);
ok(!$ok, 'etcd refuses a write without credentials: auth is on');

my $node = pg_node('auth', $etcd->url, qq{
etcd_lock.user = 'pglock'
etcd_lock.password = 'secret'
});

my %observed;
my $s = session($node);
my $s_pid = $s->pid;

# ---------------------------------------------------------------------------
# Locks work, with one authentication for many requests
# ---------------------------------------------------------------------------
my $auth0 = $etcd->grpc_calls('Authenticate', 'OK');
my $h = $s->query_safe(q{SELECT etcd_lock('auth-basic')});
like($h, qr{^etcd_lock/auth-basic/[0-9a-f]+$}, 'a lock as etcd user pglock');
is_deeply([ $etcd->keys('etcd_lock/auth-basic/') ], [$h], 'its key is in etcd');
is($s->query_safe(qq{SELECT etcd_unlock('$h')}), 't', 'unlock');
for my $i (1 .. 5)
{
	$s->query_safe(qq{SELECT etcd_unlock(etcd_lock('auth-loop'))});
	$s->query_safe(q{BEGIN; SELECT etcd_xact_lock('auth-xact'); COMMIT;});
}
my $auths = $etcd->grpc_calls('Authenticate', 'OK') - $auth0;
note "authentications for 11 locks and their releases: $auths";
cmp_ok($auths, '<=', 2,
	'one authentication per process (the session, the worker) for 30-odd requests: the token is cached');
is(scalar($etcd->keys('etcd_lock/')), 0, 'every lock is released');
is($s->query_safe('SELECT etcd_unlock_all()'), '0', 'unlock_all drops the idle lease');
$etcd->no_leftovers('basic');

# ---------------------------------------------------------------------------
# Names stay in the prefix, and etcd enforces the role
# ---------------------------------------------------------------------------
$h = $s->query_safe(q{SELECT etcd_lock('../../registry/pods')});
like($h, qr{^etcd_lock/\.\./\.\./registry/pods/[0-9a-f]+$}, 'a name with ../ stays under etcd_lock/');
is_deeply([ $etcd->keys('etcd_lock/../../registry/pods/') ], [$h],
	'etcd holds it as a literal key under etcd_lock/');
is_deeply([ $etcd->keys('registry/') ], [], 'nothing was written under registry/');
$s->query_safe('SELECT etcd_unlock_all()');

# a superuser may move the prefix (PGC_SUSET); etcd's role still confines it
my ($out, $err);
for my $case ([ 'other/', 'x' ], [ '', 'registry/pods' ])
{
	my ($prefix, $name) = @$case;
	($out, $err) = $s->query("SET etcd_lock.prefix = '$prefix'");
	is($err, '', "superuser sets etcd_lock.prefix = '$prefix'");
	($out, $err) = $s->query("SELECT etcd_lock('$name')");
	my $code = sqlstate($err);
	$observed{"lock $prefix$name outside the role"} = "$code: " . errmsg($err);
	is($code, '42501', "prefix '$prefix': etcd refuses $prefix$name/ (permission denied, 42501)");
	like($err, qr/DETAIL:  etcdserver: permission denied/, "prefix '$prefix': etcd's reason in DETAIL");
	is($out, '', "prefix '$prefix': no handle");
	$etcd->no_leftovers("prefix '$prefix'");
}
# with an empty prefix, names map 1:1, and etcd_lock/... is still allowed
$h = $s->query_safe(q{SELECT etcd_lock('etcd_lock/inside')});
like($h, qr{^etcd_lock/inside/[0-9a-f]+$}, "prefix '': a name inside the role's prefix works");
$s->query_safe('SELECT etcd_unlock_all()');
$s->query_safe('RESET etcd_lock.prefix');
$etcd->no_leftovers('prefix reset');

# ---------------------------------------------------------------------------
# The password is hidden from non-superusers
# ---------------------------------------------------------------------------
is($s->query_safe('SHOW etcd_lock.password'), 'secret', 'the superuser can read the password');
$node->safe_psql('postgres', 'CREATE ROLE alice LOGIN');
my $alice = session($node, user => 'alice');
is($alice->query_safe('SELECT current_user'), 'alice', 'a non-superuser session');
for my $g (qw(password user))
{
	($out, $err) = $alice->query("SELECT count(*) FROM pg_settings WHERE name = 'etcd_lock.$g'");
	is($out, '0', "non-superuser: pg_settings has no etcd_lock.$g row");
	my $id = EtcdLockTest::guc_ident("etcd_lock.$g");
	($out, $err) = $alice->query("SHOW $id");
	is(sqlstate($err), '42501', "non-superuser: SHOW etcd_lock.$g is refused (42501)");
	$observed{"non-superuser SHOW etcd_lock.$g"} = errmsg($err);
	($out, $err) = $alice->query("SELECT current_setting('etcd_lock.$g')");
	is(sqlstate($err), '42501', "non-superuser: current_setting('etcd_lock.$g') is refused");
	($out, $err) = $alice->query("SET $id = 'x'");
	is(sqlstate($err), '55P02', "non-superuser: SET etcd_lock.$g fails (55P02)");
}
($out, $err) = $alice->query('SELECT count(*) FROM pg_file_settings');
is(sqlstate($err), '42501', 'non-superuser: pg_file_settings (which shows the file) is refused');
($out, $err) = $alice->query(q{SELECT etcd_unlock(etcd_lock('alice'))});
is($out, 't', 'the non-superuser locks with the server\'s etcd credentials');
$alice->quit;

# ---------------------------------------------------------------------------
# A wrong password: 28P01, then fixed in the same session
# ---------------------------------------------------------------------------
$s->query_safe('SELECT etcd_unlock_all()');
set_conf($node, [$s], 'etcd_lock.password' => 'wrong-pw');
my $elapsed;
($out, $err, undef, $elapsed) = $s->query(q{SELECT etcd_lock('auth-pw')});
note "wrong password: $err";
$observed{'wrong password'} = sqlstate($err) . ': ' . errmsg($err);
is(sqlstate($err), '28P01', 'wrong password: SQLSTATE 28P01');
like($err, qr/etcd authentication failed for user "pglock"/, 'wrong password: the message names the user');
like($err, qr/DETAIL:  etcdserver: authentication failed/, 'wrong password: etcd\'s reason in DETAIL');
unlike($err, qr/wrong-pw/, 'wrong password: the error does not show the password');
cmp_ok($elapsed, '<', 10, 'wrong password: reported promptly');
$etcd->no_leftovers('wrong password');
# Our own ALTER SYSTEM statement is logged (log_statement = all): skip it.
# PostgreSQL itself logs 'parameter "etcd_lock.password" changed to "..."'
# on reload, for every setting, GUC_SUPERUSER_ONLY or not.
TODO:
{
	local $TODO = 'PostgreSQL logs a reloaded setting\'s new value, the password too';
	unlike(join('', grep { !/LOG:  statement: / } split /^/, slurp_file($node->logfile)),
		qr/wrong-pw/, 'the server log shows the password nowhere but in our ALTER SYSTEM');
}
server_ok($node, 'wrong password');

set_conf($node, [$s], 'etcd_lock.password' => undef);
($out, $err) = $s->query(q{SELECT etcd_lock('auth-pw')});
is($err, '', 'password reset: no error');
like($out, qr{^etcd_lock/auth-pw/[0-9a-f]+$}, 'password reset: the same session locks again');
is(scalar($s->query('SELECT etcd_unlock_all()')), '1', 'password reset: unlock');
# back in postgresql.conf's value, which is the right one
set_conf($node, [$s], 'etcd_lock.password' => 'secret');
$etcd->no_leftovers('password fixed');

# ---------------------------------------------------------------------------
# The token expires while the session idles; the next call re-authenticates
# ---------------------------------------------------------------------------
$s->query_safe(q{SELECT etcd_unlock(etcd_lock('auth-idle'))});
$s->query_safe('SELECT etcd_unlock_all()');    # no lease: the worker sends nothing
my $unauth0 = $etcd->grpc_calls('LeaseGrant', 'Unauthenticated')
  + $etcd->grpc_calls('Txn', 'Unauthenticated');
$auth0 = $etcd->grpc_calls('Authenticate', 'OK');
my $fail0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
# etcd drops a simple token TTL seconds after its last use, checking once a
# second: the session idles for TTL + 2 s.  Nothing outside etcd shows the
# token's end, so this is a wait on the clock; what follows checks that the
# token had indeed expired (etcd refused it once).
Time::HiRes::sleep($TOKEN_TTL + 2);
($out, $err) = $s->query(q{SELECT etcd_lock('auth-idle')});
is($err, '', 'after the token expired: no error');
like($out, qr{^etcd_lock/auth-idle/[0-9a-f]+$}, 'after the token expired: the lock works');
is($s->query_safe(qq{SELECT etcd_unlock('$out')}), 't', 'after the token expired: unlock works');
my $unauth = $etcd->grpc_calls('LeaseGrant', 'Unauthenticated')
  + $etcd->grpc_calls('Txn', 'Unauthenticated') - $unauth0;
is($unauth, 1, 'etcd refused the expired token exactly once');
is($etcd->grpc_calls('Authenticate', 'OK') - $auth0, 1, 'and the session authenticated again, once');
note 'etcd_lock_stats.failures grew by '
  . ($node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats') - $fail0);
$s->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('token expiry');

# ---------------------------------------------------------------------------
# The worker authenticates on its own and keeps a ttl-2 lock alive for 8 s,
# past several token expiries (keepalives do not refresh a token)
# ---------------------------------------------------------------------------
my $ka0 = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats');
$fail0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
$h = $s->query_safe(q{SELECT etcd_lock('auth-renew', 2)});
my $lease = lease_of($h);
like($etcd->etcdctl('lease', 'timetolive', $lease), qr/granted with TTL\(2s\)/, 'a 2 s lease');
my $missing = 0;
my $checks = sample_for(8, 0.2, sub {
		my @k = $etcd->keys($h);
		$missing++ unless @k == 1 && $k[0] eq $h;
	});
cmp_ok($checks, '>=', 8, "renewal: checked the key $checks times over 8 s");
is($missing, 0, 'renewal: the key was in etcd at every check (4 TTLs, 2 token TTLs)');
like($etcd->etcdctl('lease', 'timetolive', $lease), qr/remaining\([12]s\)/, 'renewal: the lease is alive');
my $ka = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats') - $ka0;
cmp_ok($ka, '>=', 6, "renewal: the worker sent keepalives ($ka)");
note 'worker/backend failures during renewal: '
  . ($node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats') - $fail0);
is($node->safe_psql('postgres', qq{SELECT state FROM etcd_locks WHERE pid = $s_pid}), 'held',
	'renewal: still held');
is($s->query_safe(qq{SELECT etcd_unlock('$h')}), 't', 'renewal: unlock returns true');
$s->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('renewal');

# ---------------------------------------------------------------------------
# No user against the auth etcd
# ---------------------------------------------------------------------------
set_conf($node, [$s], 'etcd_lock.user' => '', 'etcd_lock.password' => '');
($out, $err, undef, $elapsed) = $s->query(q{SELECT etcd_lock('auth-nouser')});
note "empty user: $err";
my $code = sqlstate($err);
$observed{'empty etcd_lock.user'} = "$code: " . errmsg($err);
is($out, '', 'empty user: no handle');
# etcd answers 400, code 3 (InvalidArgument) "user name is empty"
is($code, '28000', 'empty user: SQLSTATE 28000 (invalid authorization specification)');
like($err, qr/ERROR:  28000: etcd at \Q${\$etcd->url}\E requires authentication/,
	'empty user: the message says etcd wants credentials, and names the endpoint');
like($err, qr/DETAIL:  etcdserver: user name is empty/, 'empty user: etcd\'s reason in DETAIL');
like($err, qr/HINT:  Set etcd_lock.user and etcd_lock.password/, 'empty user: the hint names the settings');
cmp_ok($elapsed, '<', 10, 'empty user: reported promptly');
$etcd->no_leftovers('empty user');
set_conf($node, [$s], 'etcd_lock.user' => undef, 'etcd_lock.password' => undef);
set_conf($node, [$s], 'etcd_lock.user' => 'pglock', 'etcd_lock.password' => 'secret');
($out, $err) = $s->query(q{SELECT etcd_unlock(etcd_lock('auth-nouser'))});
is($out, 't', 'user restored: the same session locks again');
$s->query_safe('SELECT etcd_unlock_all()');
$etcd->no_leftovers('user restored');

# ---------------------------------------------------------------------------
# An etcd without auth, with etcd_lock.user set: no token is sent, and locks
# work.  etcd 3.4 without auth answers 401 (Unauthenticated, "invalid auth
# token") to any Authorization header, which the metrics below would count;
# etcd 3.5 ignores the header, so there they only show nothing was refused.
# ---------------------------------------------------------------------------
my $open = EtcdLockTest::Etcd->new(name => 'noauth');
set_conf($node, [$s], 'etcd_lock.endpoints' => $open->url);
$fail0 = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats');
($out, $err) = $s->query(q{SELECT etcd_lock('open', 2)});
is($err, '', 'etcd without auth: no error');
like($out, qr{^etcd_lock/open/[0-9a-f]+$}, 'etcd without auth: locks work with etcd_lock.user set');
is_deeply([ $open->keys('etcd_lock/open/') ], [$out], 'etcd without auth: the key is there');
for my $i (1 .. 5)
{
	$s->query_safe(q{SELECT etcd_unlock(etcd_lock('open-loop'))});
}
# the worker too renews without a token
$ka0 = $node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats');
ok( poll_until(sub {
			$node->safe_psql('postgres', 'SELECT keepalives FROM etcd_lock_stats') >= $ka0 + 4 }, undef, 'keepalives'),
	'etcd without auth: the worker renews');
is($open->grpc_calls('LeaseKeepAlive', 'Unauthenticated') + $open->grpc_calls('Txn', 'Unauthenticated'),
	0, 'etcd without auth: no request was refused as unauthenticated (on 3.4: no token sent)');
is_deeply([ $open->keys('etcd_lock/open/') ], [$out], 'etcd without auth: the key is still there');
my $attempts = $open->grpc_calls('Authenticate');
note "authenticate attempts against the etcd without auth: $attempts";
cmp_ok($attempts, '<=', 2,
	'etcd without auth: each process asks once whether auth is on, not before every request');
my $failures = $node->safe_psql('postgres', 'SELECT failures FROM etcd_lock_stats') - $fail0;
cmp_ok($failures, '<=', 2,
	"etcd without auth: etcd_lock_stats.failures counts at most that one answer per process ($failures)");
is($s->query_safe('SELECT etcd_unlock_all()'), '1', 'etcd without auth: unlock');
is_deeply([ $open->leases ], [], 'etcd without auth: no lease left');
set_conf($node, [$s], 'etcd_lock.endpoints' => $etcd->url);

$s->quit;
$etcd->no_leftovers('end');
server_ok($node, 'end');
note "observed: $_ => $observed{$_}" for sort keys %observed;
$node->stop;
done_testing();
