from aecompress.memory import available_memory


def test_the_available_memory_is_a_positive_number_of_bytes():
    found = available_memory()
    assert isinstance(found, int) and found > 0
