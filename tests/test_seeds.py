"""The test harness's seed reporting (tests/seeds.py): a failing random test says how to rerun it."""

import seeds


def test_a_failing_random_test_prints_its_seed_and_reruns_with_it(pytester, monkeypatch):
    pytester.makeconftest('pytest_plugins = ["seeds"]')
    pytester.makepyfile(
        """
        import torch

        def test_draws(rng):
            print("value", torch.randint(0, 2**30, (), generator=rng).item())
            assert False
        """
    )
    monkeypatch.delenv(seeds.SEED_VARIABLE, raising=False)
    first = pytester.runpytest("-s")
    first.assert_outcomes(failed=1)
    text = first.stdout.str()
    seed = int(text.split(f"rerun it with {seeds.SEED_VARIABLE}=")[1].split()[0])
    value = text.split("value ")[1].split()[0]
    monkeypatch.setenv(seeds.SEED_VARIABLE, str(seed))
    again = pytester.runpytest("-s")
    again.assert_outcomes(failed=1)
    assert again.stdout.str().split("value ")[1].split()[0] == value  # the same draws


def test_a_passing_test_reports_nothing(pytester):
    pytester.makeconftest('pytest_plugins = ["seeds"]')
    pytester.makepyfile("def test_ok(rng):\n    assert rng.initial_seed() >= 0\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert "rerun it with" not in result.stdout.str()
