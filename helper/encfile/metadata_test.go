package encfile

import (
	"encoding/json"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

var kindNames = map[Kind]string{String: "str", Int: "int", Number: "number", Strings: "str_list", Ints: "int_list", Floats: "float_list"}

// Fields is proto/contract.json's metadata_fields, in its order.
func TestMetadataFieldsMatchContract(t *testing.T) {
	raw, err := os.ReadFile("../../proto/contract.json")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Fields [][2]string `json:"metadata_fields"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	var got [][2]string
	for _, f := range Fields {
		got = append(got, [2]string{f.Name, kindNames[f.Kind]})
	}
	if !reflect.DeepEqual(got, c.Fields) {
		t.Fatalf("Fields = %v\ncontract.json says %v", got, c.Fields)
	}
}

// Zero values, empty lists and integers survive: Moonraker shows a bed
// temperature of 0 and an empty colour list, not "--".
func TestMetadataRoundTripKeepsTypesAndZeros(t *testing.T) {
	md := &Metadata{Values: map[string]any{
		"slicer": "PrusaSlicer", "estimated_time": int64(825), "first_layer_bed_temp": 0.0,
		"first_layer_extr_temp": 200.0, "filament_colors": []string{}, "filament_temps": []int64{200},
		"filament_weights": []float64{0}, "gcode_start_byte": int64(304), "printer_model": "",
	}}
	b, err := msgpack.Marshal(md)
	if err != nil {
		t.Fatal(err)
	}
	var got Metadata
	if err := msgpack.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got.Values, md.Values) {
		t.Fatalf("got %#v\nwant %#v", got.Values, md.Values)
	}
}

func TestMetadataRejectsWrongTypes(t *testing.T) {
	for _, tc := range []struct {
		name string
		v    map[string]any
		want string
	}{
		{"string for a number", map[string]any{"estimated_time": "soon"}, "estimated_time"},
		{"float for an int", map[string]any{"gcode_start_byte": 1.5}, "gcode_start_byte"},
		{"number for a string", map[string]any{"slicer": 3}, "slicer"},
		{"ints for strings", map[string]any{"filament_colors": []int{1}}, "filament_colors"},
		{"long string", map[string]any{"printer_model": strings.Repeat("x", 5000)}, "printer_model"},
	} {
		b, _ := msgpack.Marshal(tc.v)
		var md Metadata
		err := msgpack.Unmarshal(b, &md)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want one naming %s", tc.name, err, tc.want)
		}
	}
	b, _ := msgpack.Marshal(map[string]any{"slicer": "x", "from_the_future": []any{1, "a"}})
	var md Metadata
	if err := msgpack.Unmarshal(b, &md); err != nil || md.String("slicer") != "x" || len(md.Values) != 1 {
		t.Fatalf("an unknown key must be skipped: %v %v", err, md.Values)
	}
	if _, err := msgpack.Marshal(&Metadata{Values: map[string]any{"size": int64(1)}}); err == nil {
		t.Fatal("a writer must not publish a field the format does not have")
	}
}
